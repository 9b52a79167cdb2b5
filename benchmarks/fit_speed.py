"""Packed fits against sequential single fits: per-clip throughput and peak memory, for NeRF, SIREN and KAN.

    python benchmarks/fit_speed.py [--families nerf,siren,kan] [--packs 8,32] [--n 32768] [--steps 2]
                                   [--warmup 1] [--threads 1] [--device auto] [--no-kan-speed]

Every measurement is `fewsound.fit.fit` itself (full steps: forward, the paper's loss, backward, AdamW) with the
Table 1 model sizes, on real speech crops of N samples from the built-in corpus (1.5 s = 32,768 by default):
- single: one clip (B = 1). Fitting B clips sequentially costs B times this per step (the fits are identical in
  cost), so the sequential per-clip time per step is the single time per step.
- packed: B clips in one fit (B independent networks, batched matmuls, one optimizer step). On the CPU the
  pack's forward/backward runs in chunks of clips (fewsound.fit.auto_clips_per_chunk: one 1.5 s clip per chunk)
  with gradients accumulated per chunk; on CUDA as many clips as the GPU's free memory holds (fewsound.device).
The ratio is sequential per-clip time / packed per-clip time: > 1 means the packed path is faster per clip.

Each measurement runs in its own fresh subprocess; peak memory is that process's RSS high-water mark
(ru_maxrss) on CPU, torch.cuda.max_memory_allocated on CUDA. Time is taken over the last `--steps` steps of a
fit of warmup + steps steps (the first steps allocate). Process CPU time per step is printed beside the wall
time because on a shared machine it is the steadier of the two.

Then, unless --no-kan-speed, it runs benchmarks/kan_speed.py (the fast KAN basis against the paper code's
recursion, another of the issue's targets) and prints its comparison. Writes benchmarks/results/fit_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def measure(family: str, batch: int, n: int, steps: int, warmup: int, threads: int, device: str) -> dict:
    """One measurement; runs in a child process."""
    import resource

    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from fewsound.data.builtin import builtin_corpus
    from fewsound.fit import FitConfig, fit

    torch.set_num_threads(threads)
    speech = [c for c in builtin_corpus() if c.kind == "speech"]
    clips = []
    for i in range(batch):  # real speech, a different recording per slot (recycled, shifted, past 32 clips)
        x = speech[i % len(speech)].load(sr=22_050)
        x = np.resize(x, n + 997 * (i // len(speech)))[-n:]  # tile short recordings up to n samples
        clips.append(x / max(np.abs(x).max(), 1e-4))

    marks: list[tuple[int, float, float]] = []

    class Clock:
        def log_metrics(self, metrics, step):  # called after every step (log_every=1): a host sync on CUDA
            marks.append((step, time.perf_counter(), time.process_time()))

    cfg = FitConfig(family=family, steps=warmup + steps, log_every=1, device=device)
    is_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
    results = fit(cfg, clips, logger=Clock())
    (_, w0, c0), (_, w1, c1) = marks[warmup - 1], marks[-1]
    seconds = w1 - w0
    peak_mb = (
        torch.cuda.max_memory_allocated() if is_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ) / 2**20
    assert not any(r.diverged for r in results)
    return {
        "family": family,
        "B": batch,
        "n": n,
        "params_per_clip": results[0].num_params,
        "device": "cuda" if is_cuda else "cpu",
        "timed_steps": steps,
        "steps_per_s": steps / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "per_clip_ms_per_step": 1000 * seconds / steps / batch,
        "cpu_ms_per_step": 1000 * (c1 - c0) / steps,
        "peak_memory_mb": peak_mb,
        "memory_kind": "cuda_max_allocated" if is_cuda else "rss_high_water",
    }


def run_child(family: str, batch: int, args: argparse.Namespace) -> dict:
    spec = json.dumps(
        {
            "family": family,
            "batch": batch,
            "n": args.n,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "device": args.device,
        }
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if proc.returncode != 0:
        raise SystemExit(f"measurement {family} B={batch} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_kan_speed(args: argparse.Namespace) -> dict | None:
    script = ROOT / "benchmarks" / "kan_speed.py"
    if not script.exists():
        print("\n(benchmarks/kan_speed.py not found: no fast-vs-recursion KAN comparison)")
        return None
    out = RESULTS / "kan_speed.json"
    cmd = [sys.executable, str(script), "--n", str(args.n), "--threads", str(args.threads), "--out", str(out)]
    if args.device != "auto":
        cmd += ["--device", args.device]
    print(f"\nKAN basis: fast vs the paper code's recursion ({' '.join(cmd[1:])})", flush=True)
    proc = subprocess.run(cmd, text=True, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        print(f"kan_speed.py failed (exit {proc.returncode})")
        return None
    data = json.loads(out.read_text())
    keys = ("speedup", "speedup_cpu_time", "peak_memory_ratio")
    return {k: data[k] for k in keys if k in data} | {
        "fast_steps_per_s": data.get("fast", {}).get("steps_per_s"),
        "recursion_steps_per_s": data.get("baseline_recursion", {}).get("steps_per_s"),
        "source": "benchmarks/results/kan_speed.json",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="nerf,siren,kan")
    ap.add_argument("--packs", default="8,32", help="pack sizes B (comma-separated)")
    ap.add_argument("--n", type=int, default=32_768, help="samples per clip (default 32,768 = 1.5 s)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine has 2 shared cores)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ap.add_argument("--no-kan-speed", action="store_true", help="skip benchmarks/kan_speed.py")
    ap.add_argument("--out", type=Path, default=RESULTS / "fit_speed.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(**spec)))
        return 0
    assert args.steps >= 1 and args.warmup >= 1, "need at least one warm-up and one timed step"

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    packs = [int(b) for b in args.packs.split(",")]
    print(
        f"packed vs sequential fits: N={args.n}, {args.warmup}+{args.steps} steps, {args.threads} thread(s), "
        f"device {args.device}, {os.cpu_count()} CPUs"
    )
    header = (
        f"{'family':<6} {'B':>3} {'mode':<7} {'steps/s':>8} {'ms/step':>9} {'clip ms/step':>12} "
        f"{'cpu ms/step':>11} {'peak MB':>8} {'packed/seq':>10} {'(cpu time)':>10}"
    )
    print(header)
    print("-" * len(header))
    rows, summary = [], []
    for family in families:
        single = run_child(family, 1, args)
        rows.append({**single, "mode": "single"})
        print(
            f"{family:<6} {1:>3} {'single':<7} {single['steps_per_s']:>8.3f} {single['ms_per_step']:>9.1f} "
            f"{single['per_clip_ms_per_step']:>12.1f} {single['cpu_ms_per_step']:>11.1f} "
            f"{single['peak_memory_mb']:>8.0f}",
            flush=True,
        )
        for batch in packs:
            packed = run_child(family, batch, args)
            rows.append({**packed, "mode": "packed"})
            wall_ratio = single["per_clip_ms_per_step"] / packed["per_clip_ms_per_step"]
            cpu_ratio = single["cpu_ms_per_step"] / (packed["cpu_ms_per_step"] / batch)
            summary.append(
                {
                    "family": family,
                    "B": batch,
                    "packed_per_clip_ms_per_step": packed["per_clip_ms_per_step"],
                    "sequential_per_clip_ms_per_step": single["per_clip_ms_per_step"],
                    "throughput_ratio_packed_over_sequential": wall_ratio,
                    "cpu_time_ratio_packed_over_sequential": cpu_ratio,
                    "packed_peak_memory_mb": packed["peak_memory_mb"],
                    "sequential_peak_memory_mb": single["peak_memory_mb"],
                    "packed_not_slower": wall_ratio >= 1.0,
                }
            )
            print(
                f"{family:<6} {batch:>3} {'packed':<7} {packed['steps_per_s']:>8.3f} {packed['ms_per_step']:>9.1f} "
                f"{packed['per_clip_ms_per_step']:>12.1f} {packed['cpu_ms_per_step']:>11.1f} "
                f"{packed['peak_memory_mb']:>8.0f} {wall_ratio:>9.2f}x {cpu_ratio:>9.2f}x",
                flush=True,
            )

    slower = [s for s in summary if not s["packed_not_slower"]]
    print(
        "\npacked/seq = per-clip throughput of the pack over B sequential single fits (> 1: packed is faster);"
        " (cpu time): the same from process CPU time, steadier on a shared machine"
    )
    print(
        "packed path never slower per clip: "
        + ("yes" if not slower else "NO for " + ", ".join(f"{s['family']} B={s['B']}" for s in slower))
    )

    kan = None if args.no_kan_speed else run_kan_speed(args)
    if kan:
        print(
            f"KAN fast vs recursion: {kan.get('speedup', float('nan')):.2f}x wall, "
            f"{kan.get('speedup_cpu_time', float('nan')):.2f}x CPU time, peak memory ratio "
            f"{kan.get('peak_memory_ratio', float('nan')):.3f}"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "packed vs sequential fits (fewsound.fit.fit, full steps: forward, loss, backward, AdamW)",
        "settings": {
            "n": args.n,
            "timed_steps": args.steps,
            "warmup_steps": args.warmup,
            "threads": args.threads,
            "device": args.device,
            "families": families,
            "packs": packs,
        },
        "host": {
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m": os.getloadavg()[0],
        },
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": rows,
        "summary": summary,
        "kan_speed": kan,
    }
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
