"""Orchestration overhead of a sweep of many short fits: packed trials vs one Ray Tune trial per fit.

    python benchmarks/sweep_overhead.py                  # 1,000 packed fits + 40 one-per-trial fits (extrapolated)
    python benchmarks/sweep_overhead.py --fits 200 --per-fit 20

Both modes run the real sweep path (run_sweep: local Ray, Tune with actor reuse, one MLflow child run per fit over
HTTP to a real local server) on short fits: NERF, 4,096-sample crops of the built-in corpus, a few steps. To
isolate orchestration, the trials compute only MSE/PSNR and log no audio or spectrogram (run_sweep(metrics=...,
log_artifacts=False)); every fit still gets its child run with params, tags and metrics.

Figures, per mode:
  fit compute   sum over trials of the wall seconds inside fewsound.fit.fit() (what a sweep is for)
  capacity      wall seconds x trial slots (one trial per CPU)
  overhead      1 - fit compute / capacity: everything else (Tune scheduling, actor reuse, clip loading,
                evaluation, MLflow calls, the driver's bookkeeping, idle slots at the tail)
  fits per hour fits / wall
Ray's own start is timed separately and left out of both (it is paid once per job, whatever the sweep).
The one-trial-per-fit mode runs --per-fit fits and is extrapolated linearly to --fits (per-trial costs are
constant; said so in the output). Prints the figures and writes them as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tasks_for(n: int, clips: list, per_config: int, steps: int, length: int, seed0: int) -> list:
    """n distinct fits: `per_config` clips per config, configs differing by seed (one config = one full pack)."""
    from fewsound.fit import FitConfig
    from tune.plan import FitTask

    out = []
    seed = seed0
    while len(out) < n:
        cfg = FitConfig(family="nerf", steps=steps, seed=seed)
        out += [FitTask(cfg, c.clip_id, c.kind, length, "NERF") for c in clips[: min(per_config, n - len(out))]]
        seed += 1
    return out


def measure(name: str, tasks: list, corpus: str, pack_size: int, slots: int) -> dict:
    from tune.sweep import run_sweep

    t = time.perf_counter()
    s = run_sweep(name, tasks, corpus=corpus, experiment=f"bench-{name}", pack_size=pack_size, progress=False,
                  metrics=("mse", "psnr"), log_artifacts=False)
    wall = time.perf_counter() - t
    assert s.done == len(tasks) and s.failed == 0, (s.done, s.failed)
    fit = sum(tr["fit_seconds"] for tr in s.trials)
    return {
        "fits": len(tasks), "trials": len(s.trials), "pack_size": pack_size, "wall_s": round(wall, 2),
        "fit_compute_s": round(fit, 2), "slots": slots, "overhead_fraction": round(1 - fit / (wall * slots), 4),
        "overhead_s_per_fit": round((wall * slots - fit) / len(tasks), 4),
        "fits_per_hour": round(len(tasks) / wall * 3600),
        "eval_s": round(sum(tr["eval_seconds"] for tr in s.trials), 2),
        "mlflow_log_s": round(sum(tr["log_seconds"] for tr in s.trials), 2),
        "driver_phases_s": {k: round(v, 2) for k, v in s.timings.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fits", type=int, default=1000, help="fits in the packed mode (default: 1000)")
    p.add_argument("--per-fit", type=int, default=40, help="fits run one trial each, extrapolated (default: 40)")
    p.add_argument("--pack-size", type=int, default=20, help="fits per trial in the packed mode (default: 20, "
                   "at most the number of clips of the built-in corpus's INR protocol)")
    p.add_argument("--steps", type=int, default=10, help="steps per fit (default: 10)")
    p.add_argument("--length", type=int, default=4096, help="samples per clip (default: 4,096)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray = trial slots (default: 2)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweep_overhead.json"))
    args = p.parse_args()

    # a throw-away home: its own MLflow server and corpus cache, so runs never mix with the user's
    home = Path(tempfile.mkdtemp(prefix="fewsound-bench-"))
    os.environ["FEWSOUND_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from fewsound import tracking
    from tune.jobs import resolve_corpus
    from tune.sweep import init_ray, quiet_defaults

    load_before = os.getloadavg()
    quiet_defaults()
    tracking.tracking_uri()
    corpus = resolve_corpus(None, args.length)
    from fewsound.data.shards import open_corpus

    clips = list(open_corpus(corpus).clips())
    args.pack_size = min(args.pack_size, len(clips))  # one config = one pack of distinct clips
    t = time.perf_counter()
    init_ray(num_cpus=args.cpus)
    ray_start = time.perf_counter() - t
    try:
        # one-per-trial first, on other seeds: both modes then run on warm actors' code paths alike
        per_fit = measure("per-fit", tasks_for(args.per_fit, clips, 1, args.steps, args.length, 10_000), corpus, 1,
                          args.cpus)
        packed = measure("packed", tasks_for(args.fits, clips, args.pack_size, args.steps, args.length, 0), corpus, args.pack_size,
                         args.cpus)
    finally:
        import ray

        ray.shutdown()
        tracking.stop_local_server(home)
    scale = args.fits / args.per_fit
    per_fit["extrapolated_to_fits"] = args.fits
    per_fit["extrapolated_wall_s"] = round(per_fit["wall_s"] * scale, 1)
    result = {
        "machine": {"cpus": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"family": "nerf", "length": args.length, "steps": args.steps, "metrics": ["mse", "psnr"],
                     "artifacts": False},
        "ray_start_s": round(ray_start, 2),
        "packed": packed,
        "one_trial_per_fit": per_fit,
        "packed_speedup_fits_per_hour": round(packed["fits_per_hour"] / per_fit["fits_per_hour"], 2),
        "target_overhead_under_10pct_met": packed["overhead_fraction"] < 0.10,
    }
    print(f"load average before {load_before[0]:.1f}, after {result['machine']['load_avg_after'][0]:.1f} "
          f"on {os.cpu_count()} cores; Ray start {ray_start:.1f} s (not counted)")
    for name, r in (("packed", packed), ("one trial per fit", per_fit)):
        print(f"{name:>18}: {r['fits']} fits in {r['trials']} trials, wall {r['wall_s']:.1f} s, fit compute "
              f"{r['fit_compute_s']:.1f} s over {r['slots']} slots -> overhead {100 * r['overhead_fraction']:.1f}% "
              f"({r['overhead_s_per_fit']:.3f} s/fit), {r['fits_per_hour']} fits/h")
    print(f"one trial per fit measured on {args.per_fit} fits, extrapolated linearly to {args.fits}: "
          f"~{per_fit['extrapolated_wall_s']:.0f} s; packing is {result['packed_speedup_fits_per_hour']}x the fits/h")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
