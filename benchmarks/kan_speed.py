"""KAN forward+backward speed and peak memory: the fast path against the recursion baseline.

    python benchmarks/kan_speed.py [--n 32768] [--steps 10] [--baseline-steps 3] [--threads 1] [--device cpu]

The model is Table 1's KAN (L = 10, [48, 24, 12], G = 10, k = 2) on one clip of N samples (B = 1). One step is
forward, L1 loss against a fixed random target, and backward (no optimizer: it costs the same in both).
The baseline is `implementation="recursion"`: the paper code's formulation (Cox-de Boor recursion over all
G + k bases, dense basis tensor, one bmm, plus the SiLU branch's bmm), same parameters, same outputs within float
tolerance (checked here). The fast path is the fused `_KanLayer` (closed-form local basis, embedding_bag forward,
tiled backward; fewsound/inr/kan.py).

Wall-clock steps/s is the headline; process CPU time per step is printed too because on a shared machine
(other jobs on the same cores) it is the steadier of the two.

Each variant runs in its own fresh subprocess so peak memory is not polluted by the other: on CPU the peak is
the process's high-water RSS (ru_maxrss) minus its RSS just before the first step; on CUDA it is
torch.cuda.max_memory_allocated minus the allocation before the first step. Prints a table and writes
benchmarks/results/kan_speed.json.
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


def measure(implementation: str, n: int, steps: int, threads: int, device: str) -> dict:
    """Runs in the child process."""
    import resource

    import psutil
    import torch

    sys.path.insert(0, str(ROOT))
    from fewsound.inr import build_inr, coordinates

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    inr = build_inr("kan", implementation=implementation)
    params, buffers = inr.init([0], device=device)
    for p in params.values():
        p.requires_grad_(True)
    t = coordinates(n, device=device)
    target = torch.randn(1, n, device=device) * 0.1

    def step():
        y = inr(params, t, buffers)
        loss = (y - target).abs().mean()
        loss.backward()
        return y

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        alloc0 = torch.cuda.memory_allocated()
    y = step()  # warm-up (also the step whose output is compared across implementations)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        for p in params.values():
            p.grad = None
        step()
    sync()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - alloc0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0  # ru_maxrss is KiB on Linux
    return {
        "implementation": implementation,
        "steps": steps,
        "seconds": elapsed,
        "steps_per_s": steps / elapsed,
        "ms_per_step": 1000 * elapsed / steps,
        "cpu_ms_per_step": 1000 * cpu / steps,
        "peak_memory_mb": peak / 2**20,
        "output_head": y.detach()[0, :4096].double().cpu().tolist(),
    }


def run_child(implementation: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        implementation,
        "--n",
        str(args.n),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--steps",
        str(args.steps if implementation == "fast" else args.baseline_steps),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=10, help="timed steps of the fast path")
    ap.add_argument("--baseline-steps", type=int, default=3, help="timed steps of the recursion baseline")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine has 2 shared cores)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kan_speed.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.n, args.steps, args.threads, args.device)))
        return 0

    load_before = os.getloadavg()[0]
    base = run_child("recursion", args)
    fast = run_child("fast", args)
    max_diff = max(abs(a - b) for a, b in zip(base.pop("output_head"), fast.pop("output_head")))
    result = {
        "model": "kan table1 (L=10, widths [48,24,12], G=10, k=2), B=1, fwd+bwd, L1 loss",
        "n": args.n,
        "device": args.device,
        "threads": args.threads,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_before_after": [load_before, os.getloadavg()[0]],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "baseline_recursion": base,
        "fast": fast,
        "speedup": fast["steps_per_s"] / base["steps_per_s"],
        "speedup_cpu_time": base["cpu_ms_per_step"] / fast["cpu_ms_per_step"],
        "peak_memory_ratio": fast["peak_memory_mb"] / max(base["peak_memory_mb"], 1e-9),
        "max_abs_output_diff_first_4096": max_diff,
    }
    print(f"KAN fwd+bwd, N={args.n}, device={args.device}, threads={args.threads}")
    print(f"{'':12} {'steps/s':>9} {'ms/step':>9} {'cpu ms/step':>12} {'peak MB':>9}")
    for name, r in (("recursion", base), ("fast", fast)):
        print(
            f"{name:12} {r['steps_per_s']:9.3f} {r['ms_per_step']:9.1f} {r['cpu_ms_per_step']:12.1f} "
            f"{r['peak_memory_mb']:9.1f}"
        )
    print(
        f"speedup {result['speedup']:.1f}x wall-clock ({result['speedup_cpu_time']:.1f}x in process CPU time), "
        f"peak memory {result['peak_memory_ratio']:.2f}x of baseline, max |output diff| {max_diff:.2e}"
    )
    print(f"load average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
