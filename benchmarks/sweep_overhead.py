"""Orchestration overhead of a sweep of many short fits: packed trials vs one Ray Tune trial per fit.

    python benchmarks/sweep_overhead.py          # 1,000 packed fits at 10, 25 and 50 steps + 40 one-per-trial fits
    python benchmarks/sweep_overhead.py --fits 200 --per-fit 20 --steps 10

Both modes run the real sweep path (run_sweep: local Ray, Tune with actor reuse, one MLflow child run per fit over
HTTP to a real local server) on short fits: NERF, 4,096-sample crops of the built-in corpus, a few steps. To
isolate orchestration, the trials compute only MSE/PSNR and log no audio or spectrogram (run_sweep(metrics=...,
log_artifacts=False)); every fit still gets its child run with params, tags and metrics.

Figures, per mode:
  fit compute   sum over packs of the CPU seconds inside fewsound.fit.fit() (the fitting thread's CPU time: with
                one torch thread per trial, all of the fit's compute, and not inflated when the MLflow server
                shares the core, as its wall time would be)
  capacity      wall seconds x trial slots (one trial per CPU)
  overhead      1 - fit compute / capacity: everything else (Tune scheduling, actor start, clip loading,
                evaluation, MLflow calls and the server answering them, the driver's bookkeeping, idle slots)
  fits per hour fits / wall
  breakdown     pack setup (the resume lookup, loading clips), fit wall time (vs its CPU time: the difference
                is the core shared with everything else), eval, MLflow logging wall time (each child run through
                MLflow's client: create, one batch, end), the MLflow server's CPU seconds (it shares the 2 cores with
                the trials), and the trial slots' idle seconds before their first pack (actor start: a new
                process importing torch and MLflow, ~3 s), between packs and after their last (the tail,
                which includes the driver's closing searches and tables)
  CPU by process  where the cores went besides the fits: the driver (Tune's loop), the MLflow server, Ray's
                own processes, the trials' other threads
The packed mode bundles packs into trials (run_sweep's trials_per_slot, default 4 per slot); the one-trial-per-
fit mode is packs of one fit, one trial each (trials_per_slot=None).
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
    from fewsound.plan import FitTask

    out = []
    seed = seed0
    while len(out) < n:
        cfg = FitConfig(family="nerf", steps=steps, seed=seed)
        out += [FitTask(cfg, c.clip_id, c.kind, length, "NERF") for c in clips[: min(per_config, n - len(out))]]
        seed += 1
    return out


def server_cpu() -> float:
    """CPU seconds used so far by the local MLflow server (and its children)."""
    import psutil

    from fewsound import storage

    state = json.loads((storage.default_home() / "server.json").read_text())
    proc = psutil.Process(state["pid"])
    return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """{pid: (kind, CPU seconds so far)} of this driver, everything it started (Ray's processes, trial workers)
    and the MLflow server: where the 2 cores went besides the fits."""
    import psutil

    from fewsound import storage

    server = psutil.Process(json.loads((storage.default_home() / "server.json").read_text())["pid"])
    me = psutil.Process()
    out = {}
    for group, root in (("driver", me), ("mlflow server", server)):
        for p in [root, *root.children(recursive=True)]:
            try:
                cmd = " ".join(p.cmdline())
                t = p.cpu_times()
            except psutil.Error:
                continue
            kind = group
            if group == "driver" and p.pid != me.pid:
                title = cmd.split(" ")[0]  # Ray sets worker titles: ray::IDLE, ray::ImplicitFunc.train, ...
                kind = (
                    "ray gcs"
                    if "gcs_server" in cmd
                    else "raylet"
                    if "raylet" in cmd
                    else "ray idle workers"
                    if title.startswith("ray::IDLE")
                    else "ray trial workers"
                    if title.startswith("ray::")
                    else "ray other"
                )
            out[p.pid] = (kind, t.user + t.system)
    return out


def cpu_delta(before: dict, after: dict) -> dict[str, float]:
    total: dict[str, float] = {}
    for pid, (kind, c) in after.items():
        total[kind] = total.get(kind, 0.0) + c - (before[pid][1] if pid in before else 0.0)
    return {k: round(v, 1) for k, v in sorted(total.items())}


def measure(name: str, tasks: list, corpus: str, pack_size: int, slots: int, trials_per_slot: int | None) -> dict:
    from tune.sweep import run_sweep

    c0 = server_cpu()
    procs0 = cpu_by_process()
    t0 = time.time()
    s = run_sweep(
        name,
        tasks,
        corpus=corpus,
        experiment=f"bench-{name}",
        pack_size=pack_size,
        progress=False,
        metrics=("mse", "psnr"),
        log_artifacts=False,
        trials_per_slot=trials_per_slot,
    )
    t1 = time.time()
    procs = cpu_delta(procs0, cpu_by_process())
    # trial actors have exited by now (their CPU is not in the snapshot): their packs measured it themselves
    procs.pop("ray trial workers", None)
    procs["trials, besides the fit"] = round(sum(p["process_cpu"] - p["fit_cpu"] for p in s.packs), 1)
    wall = t1 - t0
    assert s.done == len(tasks) and s.failed == 0, (s.done, s.failed)
    fit_cpu = sum(p["fit_cpu"] for p in s.packs)
    by_worker: dict[int, list] = {}
    for p in s.packs:
        by_worker.setdefault(p["pid"], []).append(p)
    start_idle = sum(min(p["start"] for p in ps) - t0 for ps in by_worker.values())
    tail_idle = sum(t1 - max(p["end"] for p in ps) for ps in by_worker.values())
    # between two packs on one actor: Tune's report, the next trial's start on a reused actor
    gaps = sum(
        b["start"] - a["end"]
        for ps in by_worker.values()
        for a, b in zip(sorted(ps, key=lambda p: p["start"]), sorted(ps, key=lambda p: p["start"])[1:])
    )
    return {
        "fits": len(tasks),
        "packs": len(s.packs),
        "trials": s.n_trials,
        "pack_size": pack_size,
        "steps": tasks[0].cfg.steps,
        "wall_s": round(wall, 2),
        "fit_compute_s": round(fit_cpu, 2),
        "slots": slots,
        "overhead_fraction": round(1 - fit_cpu / (wall * slots), 4),
        "overhead_s_per_fit": round((wall * slots - fit_cpu) / len(tasks), 4),
        "fits_per_hour": round(len(tasks) / wall * 3600),
        "breakdown_s": {
            "pack_setup": round(sum(p["setup_seconds"] for p in s.packs), 2),
            "fit_wall": round(sum(p["fit_seconds"] for p in s.packs), 2),
            "eval": round(sum(p["eval_seconds"] for p in s.packs), 2),
            "mlflow_logging_wall": round(sum(p["log_seconds"] for p in s.packs), 2),
            "mlflow_server_cpu": round(server_cpu() - c0, 2),
            "slots_idle_before_first_pack": round(start_idle, 2),
            "slots_idle_after_last_pack": round(tail_idle, 2),
            "between_packs": round(gaps, 2),
        },
        "driver_phases_s": {k: round(v, 2) for k, v in s.timings.items()},
        "cpu_s_by_process": procs,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fits", type=int, default=1000, help="fits in the packed mode (default: 1000)")
    p.add_argument("--per-fit", type=int, default=40, help="fits run one trial each, extrapolated (default: 40)")
    p.add_argument(
        "--pack-size",
        type=int,
        default=20,
        help="fits per trial in the packed mode (default: 20, "
        "at most the number of clips of the built-in corpus's INR protocol)",
    )
    p.add_argument(
        "--steps",
        default="10,25,50",
        help="steps per fit; a comma list runs the packed mode once "
        "per value (default: 10,25,50; the one-trial-per-fit mode uses the first)",
    )
    p.add_argument("--length", type=int, default=4096, help="samples per clip (default: 4,096)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray = trial slots (default: 2)")
    p.add_argument("--trials-per-slot", type=int, default=4, help="packed mode: trials per slot (default: 4)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sweep_overhead.json"))
    args = p.parse_args()

    # a throw-away home: its own MLflow server and corpus cache, so runs never mix with the user's
    home = Path(tempfile.mkdtemp(prefix="fewsound-bench-"))
    os.environ["FEWSOUND_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from fewsound import tracking
    from tune.jobs import resolve_corpus
    from tune.ray_env import init_ray, quiet_defaults

    load_before = os.getloadavg()
    quiet_defaults()
    tracking.tracking_uri()
    corpus = resolve_corpus(None, args.length)
    from fewsound.data.corpus import open_corpus

    clips = list(open_corpus(corpus).clips())
    args.pack_size = min(args.pack_size, len(clips))  # one config = one pack of distinct clips
    t = time.perf_counter()
    init_ray(num_cpus=args.cpus)
    ray_start = time.perf_counter() - t
    try:
        # one-per-trial first, on other seeds: both modes then run on warm actors' code paths alike
        steps = [int(x) for x in args.steps.split(",")]
        per_fit = measure(
            "per-fit", tasks_for(args.per_fit, clips, 1, steps[0], args.length, 10_000), corpus, 1, args.cpus, None
        )
        runs = [
            measure(
                f"packed-{n}",
                tasks_for(args.fits, clips, args.pack_size, n, args.length, 100_000 * i),
                corpus,
                args.pack_size,
                args.cpus,
                args.trials_per_slot,
            )
            for i, n in enumerate(steps)
        ]
        packed = runs[0]
    finally:
        import ray

        ray.shutdown()
        tracking.stop_local_server(home)
    scale = args.fits / args.per_fit
    per_fit["extrapolated_to_fits"] = args.fits
    per_fit["extrapolated_wall_s"] = round(per_fit["wall_s"] * scale, 1)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "family": "nerf",
            "length": args.length,
            "steps": steps,
            "metrics": ["mse", "psnr"],
            "artifacts": False,
            "trials_per_slot": args.trials_per_slot,
        },
        "ray_start_s": round(ray_start, 2),
        "packed": packed,
        "packed_other_steps": runs[1:],
        "one_trial_per_fit": per_fit,
        "packed_speedup_fits_per_hour": round(packed["fits_per_hour"] / per_fit["fits_per_hour"], 2),
        "target_overhead_under_10pct_by_steps": {r["steps"]: r["overhead_fraction"] < 0.10 for r in runs},
    }
    print(
        f"load average before {load_before[0]:.1f}, after {result['machine']['load_avg_after'][0]:.1f} "
        f"on {os.cpu_count()} cores; Ray start {ray_start:.1f} s (not counted)"
    )
    rows = [(f"packed, {r['steps']} steps", r) for r in runs] + [(f"one trial per fit, {steps[0]} steps", per_fit)]
    for name, r in rows:
        print(
            f"{name:>28}: {r['fits']} fits in {r['packs']} packs, {r['trials']} trials, wall {r['wall_s']:.1f} s, "
            f"fit compute {r['fit_compute_s']:.1f} s over {r['slots']} slots -> overhead "
            f"{100 * r['overhead_fraction']:.1f}% ({r['overhead_s_per_fit']:.3f} s/fit), {r['fits_per_hour']} fits/h"
        )
        b = r["breakdown_s"]
        print(
            f"{'':>28}  seconds: pack setup {b['pack_setup']:.1f}, fit wall {b['fit_wall']:.1f} (CPU "
            f"{r['fit_compute_s']:.1f}), eval {b['eval']:.1f}, MLflow logging wall {b['mlflow_logging_wall']:.1f}, "
            f"MLflow server CPU {b['mlflow_server_cpu']:.1f}, slots idle before the first pack "
            f"{b['slots_idle_before_first_pack']:.1f}, between packs {b['between_packs']:.1f}, after the last "
            f"{b['slots_idle_after_last_pack']:.1f}"
        )
        print(
            f"{'':>28}  CPU seconds by process: " + ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_s_by_process"].items())
        )
    print(
        f"one trial per fit measured on {args.per_fit} fits, extrapolated linearly to {args.fits}: "
        f"~{per_fit['extrapolated_wall_s']:.0f} s; packing is {result['packed_speedup_fits_per_hour']}x the fits/h"
    )
    for r in runs:
        ok = "under" if r["overhead_fraction"] < 0.10 else "NOT under"
        print(
            f"target (overhead under 10% with packing) at {r['steps']} steps ({r['fit_compute_s'] / r['fits']:.2f} s "
            f"of compute per fit): {ok} ({100 * r['overhead_fraction']:.1f}%)"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
