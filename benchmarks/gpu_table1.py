"""Table 1 fits per GPU-hour: every family at pack sizes 1..64, through fewsound.fit.fit.

    python benchmarks/gpu_table1.py                       # the first GPU: the whole table in one command
    python benchmarks/gpu_table1.py --device cpu --quick  # sanity check of the script on a CPU
    python benchmarks/gpu_table1.py --packs "" --trials-per-gpu 1,2,4,8   # only trials sharing one GPU

A Table 1 fit is one 32,768-sample clip (1.5 s at 22,050 Hz), the family's Table 1 size (fewsound's `table1()`
preset), FitConfig's default 10,000 steps. For each family and pack size B, one fit() of B real speech clips runs
warm-up + `--steps` steps; the median step time gives

    fits per hour (one trial holding the GPU) = 3600 / (10,000 * step seconds / B)

and the peak memory of the pack (torch.cuda.max_memory_allocated on CUDA, the process's RSS high-water mark on
the CPU, which only grows). A pack that runs out of device memory ends that family's row (larger packs would too).
Step times come from a logger called every step, whose .cpu() of the step's losses waits for the device, so each
interval is one whole step.

Trials sharing a GPU (`--trials-per-gpu 1,2,4,8`): a sweep runs k trials of 1/k GPU on each card, each in its own
process, capped at its share (fewsound.device.claim_gpu_share) with its packs' chunks sized for it. For each k and
each of `--trial-families`, k processes fit a pack of `--trial-pack` clips each at once (they start their timed
steps together, at an agreed wall time); per GPU:

    fits per hour per GPU = sum over the k trials of 3600 / (10,000 * its step seconds / B)

with each trial's peak memory (torch.cuda.max_memory_allocated of its process) and the chunk its share gave.
Writes benchmarks/results/gpu_table1_<device>.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TABLE1_STEPS = 10_000


def measure(family: str, overrides: dict, clips, batch: int, steps: int, device: str) -> dict:
    """Median step seconds and peak memory of one fit() of `batch` clips."""
    import resource

    import torch

    from fewsound.fit import FitConfig, fit

    marks: list[float] = []

    class Clock:
        def log_metrics(self, metrics, step):
            marks.append(time.perf_counter())

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = FitConfig(family=family, inr=overrides, steps=steps + 1, log_every=1, device=device)
    fit(config, clips[:batch], logger=Clock())
    step_s = statistics.median(b - a for a, b in zip(marks[:-1], marks[1:]))  # the first step is the warm-up
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "family": family,
        "B": batch,
        "step_ms": 1e3 * step_s,
        "fits_per_hour": 3600.0 / (TABLE1_STEPS * step_s / batch),
        "peak_memory_mb": peak / 2**20,
    }


def trial_worker(spec: str) -> int:
    """One trial of a shared GPU (a child process): `family,B,share,n,steps,start_at`; prints its row as JSON."""
    import torch

    from fewsound.device import claim_gpu_share, cuda_clips_per_chunk
    from fewsound.inr.presets import table1

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fit_step import speech

    family, b, share, n, steps, start_at = spec.split(",")
    batch, n_samples = int(b), int(n)
    claim_gpu_share(float(share))
    clips = speech(n_samples, batch)
    torch.zeros(1, device="cuda")  # the CUDA context, before the agreed start
    chunk = cuda_clips_per_chunk(torch.device("cuda"), family, n_samples, batch)
    time.sleep(max(0.0, float(start_at) - time.time()))
    row = measure(family, table1()[family], clips, batch, int(steps), "cuda")
    print(json.dumps(dict(row, share=float(share), chunk=chunk)), flush=True)
    return 0


def shared_gpu(args, families: list[str]) -> list[dict]:
    """For each k in --trials-per-gpu and each family: k trial processes of 1/k GPU at once (see the docstring)."""
    import subprocess

    rows = []
    print(f"\ntrials sharing one GPU: a pack of {args.trial_pack} clips each, {args.n} samples")
    print(f"{'family':8} {'k':>2} {'chunk':>5} {'ms/step':>9} {'fits/h/GPU':>11} {'peak MB/trial':>14}")
    for family in families:
        for k in [int(v) for v in args.trials_per_gpu.split(",")]:
            start_at = time.time() + 8 + k  # every process up (torch, CUDA context, clips) before it
            spec = f"{family},{args.trial_pack},{1 / k},{args.n},{args.steps},{start_at}"
            procs = [
                subprocess.Popen([sys.executable, __file__, "--trial-worker", spec], stdout=subprocess.PIPE, text=True)
                for _ in range(k)
            ]
            outs = [p.communicate()[0] for p in procs]
            trials = [json.loads(o.strip().splitlines()[-1]) for o, p in zip(outs, procs) if p.returncode == 0]
            row = {"family": family, "trials_per_gpu": k, "B": args.trial_pack, "trials_ok": len(trials)}
            if trials:
                row.update(
                    fits_per_hour_per_gpu=sum(t["fits_per_hour"] for t in trials),
                    step_ms_median=statistics.median(t["step_ms"] for t in trials),
                    peak_memory_mb_per_trial=max(t["peak_memory_mb"] for t in trials),
                    chunk=trials[0]["chunk"],
                    trials=trials,
                )
                print(
                    f"{family:8} {k:2d} {row['chunk']:5d} {row['step_ms_median']:9.1f} "
                    f"{row['fits_per_hour_per_gpu']:11.4g} {row['peak_memory_mb_per_trial']:14.0f}"
                )
            else:
                print(f"{family:8} {k:2d}  every trial failed")
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--packs", default="1,2,4,8,16,32,64")
    ap.add_argument("--families", default="", help="comma-separated (default: all of Table 1)")
    ap.add_argument("--n", type=int, default=32_768)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per fit (after one warm-up step)")
    ap.add_argument("--quick", action="store_true", help="packs 1,2, 4,096 samples, 2 steps: a sanity check")
    ap.add_argument("--trials-per-gpu", default="", help="e.g. 1,2,4,8: trials sharing one GPU (CUDA only)")
    ap.add_argument("--trial-families", default="kan,wire", help="families of the shared-GPU runs")
    ap.add_argument("--trial-pack", type=int, default=16, help="clips per pack of each shared-GPU trial")
    ap.add_argument("--trial-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.trial_worker:
        return trial_worker(args.trial_worker)
    if args.quick:
        args.packs, args.n, args.steps = "1,2", 4096, 2
    if args.trials_per_gpu and not args.device.startswith("cuda"):
        ap.error("--trials-per-gpu needs --device cuda (trials share a GPU's memory)")

    import torch

    from fewsound.inr.presets import table1

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fit_step import speech

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu (--quick for a sanity check)", file=sys.stderr)
        return 2
    packs = [int(b) for b in args.packs.split(",") if b]
    presets = table1()
    families = [f for f in args.families.split(",") if f] or list(presets)
    clips = speech(args.n, max(packs, default=1))
    rows = []
    print(
        f"Table 1 fits per hour on {args.device}, one trial holding it ({args.n} samples, {TABLE1_STEPS} steps per fit)"
    )
    print(f"{'family':8} {'B':>3} {'ms/step':>9} {'fits/h':>9} {'peak MB':>9}")
    for family in families if packs else []:
        for batch in packs:
            try:
                row = measure(family, presets[family], clips, batch, args.steps, args.device)
            except torch.OutOfMemoryError:
                rows.append({"family": family, "B": batch, "out_of_memory": True})
                print(f"{family:8} {batch:3d}  out of memory")
                break
            rows.append(row)
            print(
                f"{family:8} {batch:3d} {row['step_ms']:9.1f} {row['fits_per_hour']:9.4g} {row['peak_memory_mb']:9.0f}"
            )
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {
        "device": args.device,
        "device_name": device_name,
        "host": platform.node(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "n": args.n,
        "timed_steps": args.steps,
        "quick": args.quick,
        "rows": rows,  # one trial holding the device: fits_per_hour is per GPU only at one trial per GPU
        "shared_gpu": [],
    }
    if args.trials_per_gpu:
        result["shared_gpu"] = shared_gpu(args, [f for f in args.trial_families.split(",") if f])
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_table1_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
