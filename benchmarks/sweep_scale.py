"""A sweep of many short fits end to end, through the real job path: where the time goes as N grows.

    python benchmarks/sweep_scale.py                       # 10,000 fits on a local Ray (one trial slot per CPU)
    nice -n 10 python benchmarks/sweep_scale.py --fits 1000
    python benchmarks/sweep_scale.py --fits 1000 --cluster # on an emulated autoscaling cluster (fake_multinode)
    python benchmarks/sweep_scale.py --compare             # the N = 1,000 vs 10,000 table of the saved results

The fits are short on purpose, so that nearly everything measured is the machinery around them: NERF, a few steps,
4,096-sample crops of the built-in corpus's clips (each clip reused by many fits: configs differ by seed, so keys
differ), the metrics MSE and PSNR. They go through run_sweep exactly as jobs/fit_inrs.py calls it (its defaults:
packs of 16, 4 trials per slot, per-fit artifacts (audio/pred.flac, plots/spectrogram.png), each clip's target
once, the tables and the listening page on the parent run at the end; --no-artifacts turns the files off), on a
throw-away FEWSOUND_HOME with its own embedded MLflow server (SQLite). Then the same sweep is run again: every
fit is finished, so the re-run only looks up, skips and reports.

Figures (all in the results file, benchmarks/results/sweep_scale_<N>[_cluster].json):
  wall, fits/hour         of the first run (Ray's start excluded: paid once per job whatever the sweep)
  overhead per fit        (wall x trial slots - the fits' and metrics' own time) / N, in slot-seconds, the issue's
                          measure; the own time is what the packs report (fit_seconds + eval_seconds, wall time
                          inside fewsound.fit.fit and fewsound.metrics.evaluate)
  overhead CPU per fit    every process's CPU (driver, Ray's processes, the MLflow server, the trials) minus the
                          fits' and metrics' CPU, per fit: the same cost measured in CPU, which unlike wall time
                          does not grow when other jobs share the cores
  split of the slots      slot-seconds per stage: pack setup (resume lookup, clips), fit, metrics, artifacts
                          (FLAC, PNG), records, and the rest (Tune: scheduling, reports, actor start, idle slots
                          at the start and the tail, waits for logging); MLflow logging runs in the background
                          while the next pack fits, so its wall time is given beside the split
  planning                keys, packing and bundling of the N fits (what run_sweep does before Tune), timed alone
  driver phases           run_sweep's own timings: MLflow setup (parent run, replay, the finished-runs lookup),
                          Tune, the closing lookups, the tables and the listening page
  re-run                  wall time of the same sweep when every fit is finished
  driver peak memory      this process's peak RSS (the driver runs here)
  MLflow server CPU       its CPU seconds during the first run and during the re-run
  bytes per fit           the sweep's records folder + the MLflow artifact store (+ the SQLite store) / N
  per-metric cost         each metric alone on one pack of clips, ms per fit
  cluster                 worker nodes started (by type) and fits per node (from each child run's node tag)
The machine's load average is recorded before and after: on a shared machine wall times grow with it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import resource
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
# Ray's bookkeeping release test (release/tune_tests/scalability_tests: 10,000 trials of 1 s on 16 CPUs)
ANCHOR = {"trials": 10_000, "trial_seconds": 1.0, "cpus": 16, "overhead_fraction": 0.14, "overhead_s_per_trial": 0.14}
GOALS = {"overhead_slot_s_per_fit": 0.1, "rerun_s_at_10000": 60.0}
TABLE = {"title": "Scale benchmark: short NERF fits", "paper_table": None, "label_order": ["NERF"]}


def tasks_for(n: int, clips: list, per_config: int, steps: int, length: int) -> list:
    """n distinct fits: `per_config` clips per config (a full pack), configs differing by seed, clips rotating."""
    from fewsound.fit import FitConfig
    from fewsound.plan import FitTask

    out: list = []
    seed = 0
    while len(out) < n:
        cfg = FitConfig(family="nerf", steps=steps, seed=seed)
        k = min(per_config, n - len(out))
        picked = [clips[(seed * per_config + j) % len(clips)] for j in range(k)]
        out += [FitTask(cfg, c.clip_id, c.kind, length, "NERF") for c in picked]
        seed += 1
    return out


def du(path: Path) -> int:
    """Bytes of the files under `path` (or of the file `path`)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def planning_seconds(tasks: list, pack_size: int, slots: int, trials_per_slot: int) -> dict[str, float]:
    """What run_sweep computes from the task list before Tune starts, timed alone (on fresh copies of the tasks)."""
    import dataclasses

    from fewsound.plan import bundle, pack
    from tune.sweep.driver import sweep_id
    from tune.sweep.plan import check_arguments

    tasks = [dataclasses.replace(t) for t in tasks]  # fresh tasks: their keys not computed yet
    t = time.perf_counter()
    check_arguments("bench", tasks, 0.25, pack_size, 1, 1, trials_per_slot, None)
    sweep_id("bench", tasks)
    keys = time.perf_counter() - t
    t = time.perf_counter()
    packs = pack(tasks, pack_size)
    bundles = bundle(packs, slots * trials_per_slot)
    packing = time.perf_counter() - t
    return {
        "keys_s": round(keys, 3),
        "pack_and_bundle_s": round(packing, 3),
        "packs": len(packs),
        "trials": len(bundles),
    }


def metric_costs(corpus: str, clips: list, length: int, metrics: list[str], n: int = 16) -> dict[str, float]:
    """ms per fit of each metric alone, on `n` clips vs a noisy copy (what a trial's evaluate does per kind)."""
    import numpy as np

    from fewsound.metrics import evaluate
    from tune.sweep.context import load_clip

    refs = np.stack([load_clip(corpus, c.clip_id, length) for c in clips[:n]])
    recs = refs + 0.01 * np.random.default_rng(0).standard_normal(refs.shape).astype(np.float32)
    out = {}
    for m in metrics:
        evaluate(refs[:1], recs[:1], 16_000, kind="music", metrics=[m])  # warm up (imports)
        t = time.perf_counter()
        evaluate(refs, recs, 16_000, kind="music", metrics=[m])
        out[m] = round(1000 * (time.perf_counter() - t) / len(refs), 3)
    return out


def one_sweep(tasks: list, corpus: str, args: argparse.Namespace, address: str | None) -> tuple[Any, float]:
    from tune.sweep import run_sweep

    t = time.perf_counter()
    s = run_sweep(
        "fit_inrs",
        tasks,
        corpus=corpus,
        experiment=args.experiment,
        pack_size=args.pack_size,
        address=address,
        trials_per_slot=args.trials_per_slot,
        metrics=tuple(args.metrics.split(",")),
        log_artifacts=not args.no_artifacts,
        progress=args.progress,
        table=TABLE,
    )
    return s, time.perf_counter() - t


def stage_split(packs: list[dict], wall: float, slots: float) -> dict[str, float]:
    """Slot-seconds per stage of the first run. A trial logs pack k in a background thread while pack k + 1 fits
    (tune.sweep.trial.run_packs), so `mlflow_logging_background` is wall time beside the slot's other stages, not
    part of their sum; `tune_and_idle`: the slots' time outside the in-turn stages (Tune, actor start, idle slots,
    and a trial waiting for its last pack's logging, or for a logging that outlasted the next fit)."""
    keys = {"setup": "setup_seconds", "fit": "fit_seconds", "metrics": "eval_seconds",
            "artifacts": "artifact_seconds"}  # fmt: skip
    out = {k: sum(p.get(v, 0.0) for p in packs) for k, v in keys.items()}
    out["records"] = sum(p.get("record_seconds", 0.0) - p.get("artifact_seconds", 0.0) for p in packs)
    out["tune_and_idle"] = wall * slots - sum(out.values())
    out["mlflow_logging_background"] = sum(p.get("log_seconds", 0.0) for p in packs)
    return {k: round(v, 2) for k, v in out.items()}


def measure(args: argparse.Namespace, address: str | None, home: Path) -> dict:
    from sweep_overhead import cpu_by_process, cpu_delta, server_cpu

    from fewsound.data.corpus import open_corpus
    from tune.jobs import resolve_corpus
    from tune.ray_env import init_ray
    from tune.sweep.driver import records_root

    corpus = resolve_corpus(None, args.length)
    clips = list(open_corpus(corpus).clips())
    per_config = min(args.pack_size, len(clips))
    tasks = tasks_for(args.fits, clips, per_config, args.steps, args.length)
    t = time.perf_counter()
    init_ray(address, num_cpus=args.cpus)
    ray_start = time.perf_counter() - t

    c0, procs0 = server_cpu(), cpu_by_process()
    s, wall = one_sweep(tasks, corpus, args, address)
    procs = cpu_delta(procs0, cpu_by_process())
    server_first = server_cpu() - c0
    rss_first = peak_rss_mb()
    assert s.done == len(tasks) and s.failed == 0, (s.done, s.failed)
    slots = _slots()
    packs = s.packs
    own = sum(p["fit_seconds"] + p["eval_seconds"] for p in packs)
    own_cpu = sum(p["fit_cpu"] + p["eval_cpu"] for p in packs)
    trials_cpu = sum(p["process_cpu"] for p in packs)  # trial processes exit with their actors: measured inside
    procs.pop("ray trial workers", None)
    all_cpu = sum(procs.values()) + trials_cpu
    procs["trials (all threads)"] = round(trials_cpu, 1)

    c1 = server_cpu()
    s2, rerun = one_sweep(tasks, corpus, args, address)
    assert s2.skipped == len(tasks) and s2.done == 0 and s2.failed == 0, (s2.skipped, s2.done, s2.failed)
    records = du(Path(records_root(args.experiment)))
    artifacts = du(home / "artifacts")
    db = sum(du(f) for f in home.glob("mlflow.db*"))  # with its write-ahead log
    out = {
        "fits": len(tasks),
        "packs": len(packs),
        "trials": s.n_trials,
        "slots": slots,
        "resources_per_trial": s.resources,
        "ray_start_s": round(ray_start, 2),
        "wall_s": round(wall, 1),
        "fits_per_hour": round(len(tasks) / wall * 3600),
        "own_compute_slot_s": round(own, 2),
        "overhead_slot_s_per_fit": round((wall * slots - own) / len(tasks), 4),
        "overhead_fraction_of_slots": round(1 - own / (wall * slots), 4),
        "own_compute_cpu_s": round(own_cpu, 2),
        "overhead_cpu_s_per_fit": round((all_cpu - own_cpu) / len(tasks), 4),
        "cpu_s_by_process": procs,
        "slot_seconds_by_stage": stage_split(packs, wall, slots),
        "planning": planning_seconds(tasks, args.pack_size, slots, args.trials_per_slot),
        "driver_phases_s": {k: round(v, 2) for k, v in s.timings.items()},
        "rerun_s": round(rerun, 1),
        "rerun_driver_phases_s": {k: round(v, 2) for k, v in s2.timings.items()},
        "driver_peak_rss_mb": {"after_first_run": round(rss_first), "after_rerun": round(peak_rss_mb())},
        "mlflow_server_cpu_s": {"first_run": round(server_first, 1), "rerun": round(server_cpu() - c1, 1)},
        "bytes_per_fit": {
            "records": round(records / len(tasks)),
            "mlflow_artifacts": round(artifacts / len(tasks)),
            "records_and_artifacts": round((records + artifacts) / len(tasks)),
            "mlflow_sqlite_store": round(db / len(tasks)),
        },
        "tables_and_listen_page_s": round(s.timings.get("tables_and_listen_page", float("nan")), 2),
        "metric_ms_per_fit": metric_costs(corpus, clips, args.length, args.metrics.split(",")),
    }
    return out


def _slots() -> int:
    """Trial slots the sweep planned for (run_sweep's plan: the local CPUs, or the cluster's ceiling)."""
    from tune.ray_env import init_ray
    from tune.sweep.plan import plan_sweep

    return plan_sweep(init_ray(), 0.25).slots


def nodes_and_fits(experiment: str) -> dict:
    """Worker nodes that were up (by type) and fits per node (the child runs' node tags)."""
    import ray
    from mlflow.tracking import MlflowClient

    from fewsound.tracking import tracking_uri
    from tune.spine import FIT_KEY_TAG, NODE_TAG, search_runs

    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Resources"].get("GPU", 0) > 0}
    client = MlflowClient(tracking_uri=tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, experiment
    runs = search_runs(client, exp.experiment_id, "attributes.status = 'FINISHED'")
    per = collections.Counter(r.data.tags.get(NODE_TAG, "?") for r in runs if FIT_KEY_TAG in r.data.tags)
    kinds = collections.Counter("gpu_multi" if r.get("gpu_multi") else "gpu_spot" for r in nodes.values())
    return {
        "worker_nodes_started": dict(kinds),
        "fits_per_node": {f"{nid[-6:]} ({int(nodes.get(nid, {}).get('GPU', 0))} GPU)": n for nid, n in per.items()},
    }


def auth_token(root: Path) -> dict[str, str]:
    """Ray's token authentication, on as in cluster.yaml and the tests' emulated cluster: a fresh token in a file
    of `root` only this user reads, and the variables that make `ray start` and every driver use it. Ray reads
    them when it is imported, so they are set in this process before anything imports Ray."""
    token = root / "ray_auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    assert "ray" not in sys.modules, "set Ray's authentication before Ray is imported"
    os.environ.update(env)
    return env


@contextlib.contextmanager
def emulated_cluster(root: Path) -> Iterator[str]:
    """Ray's fake_multinode autoscaling cluster as tests/test_autoscaling.py starts it (tests/support.py's RayHead:
    free ports, its own temp dir; node types mirroring cluster.yaml, a 0-CPU head; token authentication on, see
    auth_token), the ceiling set for the driver. Yields the GCS address."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_autoscaling as emu
    from support import VENV_BIN, RayHead

    env = {**os.environ, **emu.CEILING, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    assert env.get("RAY_AUTH_MODE") == "token", "auth_token() first"
    env.pop("RAY_ADDRESS", None)
    os.environ.update(emu.CEILING)  # the driver plans for the ceiling: pending trials make the autoscaler grow
    config = root / "autoscaling.json"
    extra = [f"--autoscaling-config={config}", "--num-cpus=0", "--num-gpus=0",
             f"--object-store-memory={emu.STORE['object_store_memory']}"]  # fmt: skip
    head = RayHead(root, env, extra=extra, dashboard=True, host=socket.gethostbyname(socket.gethostname()), cwd=ROOT)
    config.write_text(json.dumps(emu.fake_cluster_config(head.gcs)))
    try:
        head.start(attempts=1)  # the autoscaling config names its GCS port
        yield head.gcs
    finally:
        import ray

        ray.shutdown()
        head.stop()  # the head, its autoscaler and the nodes it started


def compare(cluster: bool) -> None:
    """The N = 1,000 vs 10,000 table of the saved results, with the anchor and the goals."""
    suffix = "_cluster" if cluster else ""
    runs = {n: RESULTS / f"sweep_scale_{n}{suffix}.json" for n in (1000, 10_000)}
    have = {n: json.loads(p.read_text())["result"] for n, p in runs.items() if p.exists()}
    if not have:
        print("no saved results to compare")
        return
    rows: list[tuple[str, Any, Any]] = [
        ("wall (s)", lambda r: r["wall_s"], "-"),
        ("fits/hour", lambda r: r["fits_per_hour"], "-"),
        ("orchestration, slot-s per fit", lambda r: r["overhead_slot_s_per_fit"], ANCHOR["overhead_s_per_trial"]),
        ("orchestration, CPU-s per fit", lambda r: r["overhead_cpu_s_per_fit"], "-"),
        ("planning (s)", lambda r: round(r["planning"]["keys_s"] + r["planning"]["pack_and_bundle_s"], 2), "-"),
        ("re-run when all finished (s)", lambda r: r["rerun_s"], "-"),
        ("tables + listening page (s)", lambda r: r["tables_and_listen_page_s"], "-"),
        ("driver peak RSS (MB)", lambda r: r["driver_peak_rss_mb"]["after_rerun"], "-"),
        ("MLflow server CPU (s)", lambda r: r["mlflow_server_cpu_s"]["first_run"], "-"),
        ("bytes per fit (records+artifacts)", lambda r: r["bytes_per_fit"]["records_and_artifacts"], "-"),
    ]
    rows.append(("load average before (1 min)", None, "-"))
    ns = sorted(have)
    loads = {n: json.loads(runs[n].read_text())["machine"]["load_avg_before"][0] for n in ns}
    head = f"{'':36}" + "".join(f"{f'N={n:,}':>14}" for n in ns) + f"{'Ray anchor':>14}"
    print(head)
    for name, get, anchor in rows:
        cells = [loads[n] if get is None else get(have[n]) for n in ns]
        print(f"{name:36}" + "".join(f"{c!s:>14}" for c in cells) + f"{anchor!s:>14}")
    a, g = ANCHOR, GOALS
    print(
        f"anchor: Ray Tune's bookkeeping release test, {a['trials']:,} trials of {a['trial_seconds']} s on "
        f"{a['cpus']} CPUs, ~{100 * a['overhead_fraction']:.0f}% overhead; goals: <= "
        f"{g['overhead_slot_s_per_fit']} slot-s per fit at N=10,000, re-run < {g['rerun_s_at_10000']:.0f} s"
    )
    if len(ns) == 2:
        a, b = have[ns[0]], have[ns[1]]
        ratio = ns[1] / ns[0]
        for k in ("wall_s", "rerun_s", "tables_and_listen_page_s"):
            print(f"{k}: x{b[k] / a[k]:.1f} for x{ratio:.0f} the fits (linear: x{ratio:.0f})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fits", type=int, default=10_000, help="fits in the sweep (default: 10,000)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per fit (default: 5)")
    p.add_argument("--length", type=int, default=4096, help="samples per clip (default: 4,096)")
    p.add_argument("--metrics", default="mse,psnr", help="metrics computed per fit (default: mse,psnr)")
    p.add_argument("--pack-size", type=int, default=16, help="fits per pack (default: 16, the job's)")
    p.add_argument("--trials-per-slot", type=int, default=4, help="trials per slot (default: 4, the job's)")
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--no-artifacts", action="store_true", help="no per-fit audio and spectrogram")
    p.add_argument("--cluster", action="store_true", help="on an emulated autoscaling cluster (fake_multinode)")
    p.add_argument("--progress", action="store_true", help="the sweep's own progress lines")
    p.add_argument("--compare", action="store_true", help="only print the N = 1,000 vs 10,000 table")
    p.add_argument("--out", default=None, help="results file (default: results/sweep_scale_<N>[_cluster].json)")
    p.add_argument("--keep-home", default=None, help="FEWSOUND_HOME to use and keep (its MLflow store, records)")
    args = p.parse_args()
    if args.compare:
        compare(args.cluster)
        return 0
    args.experiment = f"scale-{args.fits}"
    if args.keep_home:
        home = Path(args.keep_home).resolve()
        if home.exists() and any(home.iterdir()):
            p.error(f"--keep-home {home}: not empty (the benchmark needs a fresh home)")
        home.mkdir(parents=True, exist_ok=True)
    else:
        home = Path(tempfile.mkdtemp(prefix="fewsound-scale-"))
    os.environ["FEWSOUND_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if args.cluster:
        auth_token(home)
    from fewsound import tracking
    from tune.ray_env import quiet_defaults

    quiet_defaults()
    tracking.tracking_uri()
    load_before = os.getloadavg()
    try:
        if args.cluster:
            with emulated_cluster(home) as gcs:
                result = measure(args, gcs, home)
                result["cluster"] = nodes_and_fits(args.experiment)
        else:
            result = measure(args, None, home)
    finally:
        import ray

        ray.shutdown()
        tracking.stop_local_server(home)
        if not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "family": "nerf",
            "steps": args.steps,
            "length": args.length,
            "metrics": args.metrics.split(","),
            "artifacts": not args.no_artifacts,
            "pack_size": args.pack_size,
            "trials_per_slot": args.trials_per_slot,
            "cluster": args.cluster,
        },
        "anchor": ANCHOR,
        "goals": GOALS,
        "result": result,
    }
    path = Path(args.out or RESULTS / f"sweep_scale_{args.fits}{'_cluster' if args.cluster else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"wrote {path}")
    compare(args.cluster)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
