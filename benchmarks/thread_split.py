"""How one KAN fit step can use a machine's cores: four ways to spend T threads, measured interleaved.

    python benchmarks/thread_split.py [--threads all] [--n 32768] [--steps 3] [--rounds 5] [--competing 0]
                                      [--out benchmarks/results/thread_split.json]

The step is fewsound's Table 1 KAN forward, the paper's loss (L1 + 5-resolution mel-STFT) and backward, on one
real speech clip of N samples (the optimizer's update, under 1% of the step, is left out). Per clip:

- `1 thread`: one clip at one intra-op thread (the reference);
- `intra-op`: one clip at T intra-op (OpenMP) threads, every op split over them (what `fewsound.fit` did for a
  single clip before it split samples);
- `split samples`: one clip whose N samples are split into T segments, each segment's INR forward and backward
  on its own worker thread at one intra-op thread (the INR is pointwise in t), the loss on the whole prediction
  at T threads between the two, the segments' parameter gradients summed (what `fewsound.fit` does for a single
  clip on the CPU);
- `T clips side by side`: T independent clips, one per worker thread at one intra-op thread (what a pack of clips
  does on the CPU): the most T threads can give, with no synchronisation at all.

`--competing K` runs K other processes meanwhile, each a one-thread loop of matrix products: the shape of a
machine where something else runs too (a laptop's other work, the MLflow server and Ray beside a fit, a second
trial). Medians of `--steps` steps per way per round, rounds interleaved (a shared machine's drift hits every
way alike). Prints ms per clip step, the speed-up over `1 thread` and the range; writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WAYS = ("1 thread", "intra-op", "split samples", "T clips side by side")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="all", help="T: torch threads ('all' = every core)")
    ap.add_argument("--n", type=int, default=32_768)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per way per round (after a warm-up step)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--competing", type=int, default=0, help="other busy one-thread processes meanwhile")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "thread_split.json")
    ap.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)  # a competing process's loop
    args = ap.parse_args()
    if args.busy:
        return busy()
    threads = (os.cpu_count() or 1) if args.threads == "all" else int(args.threads)

    import torch
    from fit_step import speech

    from fewsound.inr import build_inr, coordinates
    from fewsound.inr.presets import table1
    from fewsound.losses import ReconstructionLoss

    torch.set_flush_denormal(True)
    inr = build_inr("kan", **table1()["kan"])
    t = coordinates(args.n)
    clips = torch.from_numpy(np.stack(speech(args.n, threads)))
    nets = []
    for b in range(threads):  # one network and its loss per clip
        params, buffers = inr.init([b])
        params = {k: v.requires_grad_(True) for k, v in params.items()}
        nets.append((params, buffers, ReconstructionLoss(clips[b : b + 1], lambda_t=1.0, lambda_f=1.0, sr=22_050)))

    def one_thread_worker() -> None:  # torch's thread count is per thread once set there
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)

    pool = ThreadPoolExecutor(threads, initializer=one_thread_worker)
    segments = [(args.n * j // threads, args.n * (j + 1) // threads) for j in range(threads)]

    def step(net) -> None:  # forward, loss, backward of one clip on the calling thread
        params, buffers, loss = net
        loss(inr(params, t, buffers)).sum().backward()

    def at_threads(count: int, fn) -> None:
        torch.set_num_threads(count)
        try:
            fn()
        finally:
            torch.set_num_threads(threads)

    def split_samples() -> None:
        params, buffers, loss = nets[0]
        keys = list(params)
        preds: list = [None] * threads
        grads: list = [None] * threads

        def forward(j: int) -> None:
            a, b = segments[j]
            preds[j] = inr(params, t[a:b], buffers)

        def backward(j: int) -> None:
            a, b = segments[j]
            grads[j] = torch.autograd.grad(preds[j], [params[k] for k in keys], whole.grad[:, a:b])

        list(pool.map(forward, range(threads)))
        whole = torch.cat([p.detach() for p in preds], dim=-1).requires_grad_(True)
        loss(whole).sum().backward()
        list(pool.map(backward, range(threads)))
        for i, k in enumerate(keys):
            params[k].grad = sum(g[i] for g in grads)

    ways = {
        "1 thread": (1, lambda: at_threads(1, lambda: step(nets[0]))),
        "intra-op": (1, lambda: step(nets[0])),
        "split samples": (1, split_samples),
        "T clips side by side": (threads, lambda: list(pool.map(step, nets))),
    }
    competing = [
        subprocess.Popen([sys.executable, __file__, "--busy"], env={**os.environ, "OMP_NUM_THREADS": "1"})
        for _ in range(args.competing)
    ]
    try:
        times = measure(ways, args.rounds, args.steps, threads)
    finally:
        for p in competing:
            p.kill()
            p.wait()
    loads = times.pop("_loads")
    ms = {w: 1e3 * statistics.median(v) for w, v in times.items()}
    print(
        f"T = {threads} threads, N = {args.n}, {args.competing} competing processes; load average (1 min) "
        "around the rounds: " + ", ".join(f"{v:.1f}" for v in loads)
    )
    print(f"{'way':24} {'ms per clip step':>17} {'vs 1 thread':>12}  range")
    for w in WAYS:
        print(
            f"{w:24} {ms[w]:17.1f} {ms['1 thread'] / ms[w]:11.2f}x  {1e3 * min(times[w]):.0f}-{1e3 * max(times[w]):.0f}"
        )
    result = {
        "what": __doc__.splitlines()[0],
        "threads": threads,
        "n": args.n,
        "competing_processes": args.competing,
        "torch": torch.__version__,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load_average_1m": loads,
        "ms_per_clip_step": ms,
        "speedup_vs_1_thread": {w: ms["1 thread"] / ms[w] for w in WAYS},
        "times_s": times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


def measure(ways: dict, rounds: int, steps: int, threads: int) -> dict[str, list[float]]:
    """Seconds per clip of `steps` steps of every way per round (after a warm-up step), rounds interleaved; the
    1-minute load average around the rounds under "_loads"."""
    import torch

    times: dict[str, list[float]] = {w: [] for w in ways}
    torch.set_num_threads(threads)
    loads = [os.getloadavg()[0]]
    for _ in range(rounds):
        for way, (clips_per_step, fn) in ways.items():
            fn()  # warm-up
            for _ in range(steps):
                t0 = time.perf_counter()
                fn()
                times[way].append((time.perf_counter() - t0) / clips_per_step)
        loads.append(os.getloadavg()[0])
    return {**times, "_loads": loads}


def busy() -> int:
    """A competing process: one thread of 256 x 256 matrix products until killed."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    while True:
        a = torch.tanh(a @ a)


if __name__ == "__main__":
    raise SystemExit(main())
