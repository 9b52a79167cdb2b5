"""What one fit's MLflow child run costs on the two tracking servers a user meets: the tracking server's CPU,
the client's CPU and the wall time per run, in the same run on the same machine.

    python benchmarks/mlflow_run_cost.py [--runs 300] [--repeats 2]

A child run here is exactly what a sweep logs per fit when artifacts are off (fewsound.tracking.log_run, as
tune/sweep/trial.py calls it): create the run with its tags (parent, sweep, pack, key, ...), one batch of params and
final metrics, then mark it FINISHED - the params and tags of a real FitTask, the metrics of evaluate(). Two
servers, each a fresh real `mlflow server` (one worker, SQLite store in its own temporary directory, proxied
artifacts):

  uvicorn       MLflow's default server (ASGI, MLflow's Flask app behind an adapter), SQLite defaults: the baseline
  gunicorn+wal  fewsound's embedded server (fewsound/mlflow_gunicorn.py: plain WSGI worker, SQLite in WAL mode
                with synchronous=NORMAL), as jobs start it

Runs are sent one after the other from this process (a sweep sends several at once, which changes wall time but
not CPU per run). Server CPU is read from /proc via psutil (the server and its worker processes). The servers
run in turn, `--repeats` times each, and the median per server is reported with the ratio to the baseline.
Prints the figures and writes benchmarks/results/mlflow_run_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def start_server(home: Path, gunicorn: bool) -> tuple[subprocess.Popen, str]:
    from fewsound import tracking

    if gunicorn:  # the embedded default exactly as jobs start it
        uri = tracking.start_local_server(home=home, port=None)
        pid = json.loads((home / "server.json").read_text())["pid"]
        import psutil

        return psutil.Process(pid), uri
    port = tracking._free_port()
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination",
        str(home / "artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        cmd, stdout=open(home / "server.log", "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not tracking._healthy(uri):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"the MLflow server did not start; see {home / 'server.log'}")
        time.sleep(0.5)
    import psutil

    return psutil.Process(proc.pid), uri


def server_cpu(proc) -> float:  # noqa: ANN001
    return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])


def payload() -> tuple[dict, dict, dict]:
    """Tags, params and metrics of one real fit's child run."""
    from fewsound.fit import FitConfig
    from fewsound.plan import FitTask

    task = FitTask(FitConfig(family="nerf", steps=10), "speech-00", "speech", 4096, "NERF")
    tags = {
        "fewsound.key": task.key,
        "fewsound.sweep": "bench",
        "fewsound.pack": "0123456789ab",
        "fewsound.family": "nerf",
        "fewsound.label": "NERF",
        "fewsound.attempts": "1",
        "fewsound.node": "0" * 56,
        "mlflow.source.git.commit": "0" * 40,
    }
    params = {k: str(v) for k, v in task.params().items()}
    metrics = {
        "mse": 1e-3,
        "psnr": 30.1,
        "lsd": 1.2,
        "si_snr": 11.0,
        "snr": 11.2,
        "pesq": 1.6,
        "stoi": 0.88,
        "cdpam": 0.31,
        "wd_hf": 0.01,
        "fit/final_loss": 1e-3,
        "fit/seconds": 0.2,
        "fit/steps": 10,
    }
    return tags, params, metrics


def one_setup(gunicorn: bool, runs: int) -> dict:
    from mlflow.tracking import MlflowClient

    from fewsound import tracking

    tags, params, metrics = payload()
    home = Path(tempfile.mkdtemp(prefix="fewsound-runcost-"))
    proc, uri = start_server(home, gunicorn)
    try:
        client = MlflowClient(uri)
        exp = tracking.get_or_create_experiment(client, "run-cost")
        parent = client.create_run(exp, run_name="parent").info.run_id
        t = dict(tags, **{tracking.PARENT_TAG: parent})

        def one(i: int) -> None:
            tracking.log_run(client, exp, run_name=f"fit-{i}", tags=t, params=params, metrics=metrics)

        for i in range(10):  # warm up: connections, caches, the server's first-request imports
            one(i)
        s0, c0, t0 = server_cpu(proc), time.process_time(), time.perf_counter()
        for i in range(runs):
            one(i)
        s1, c1, t1 = server_cpu(proc), time.process_time(), time.perf_counter()
        n = len(client.search_runs([exp], max_results=runs + 1000))
        assert n == runs + 10 + 1, n  # every run landed (+ warm-up and parent)
    finally:
        import signal

        os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
    return {
        "wall_ms": 1000 * (t1 - t0) / runs,
        "server_cpu_ms": 1000 * (s1 - s0) / runs,
        "client_cpu_ms": 1000 * (c1 - c0) / runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=300, help="child runs timed per set-up and repeat")
    ap.add_argument("--repeats", type=int, default=2, help="times each set-up runs (in turn); medians reported")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "mlflow_run_cost.json"))
    a = ap.parse_args()
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    setups = {"uvicorn (MLflow's default server)": False, "gunicorn+wal (fewsound's embedded server)": True}
    load0 = os.getloadavg()
    raw: dict[str, list[dict]] = {k: [] for k in setups}
    for rep in range(a.repeats):
        for name, g in setups.items():
            r = one_setup(g, a.runs)
            raw[name].append(r)
            print(
                f"  [{rep + 1}/{a.repeats}] {name:42s} wall {r['wall_ms']:5.1f} ms  server CPU "
                f"{r['server_cpu_ms']:5.1f} ms  client CPU {r['client_cpu_ms']:5.1f} ms per run",
                flush=True,
            )
    med = {name: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} for name, rs in raw.items()}
    base, now = (med[name] for name in setups)
    print(f"\nper child run, median of {a.repeats} x {a.runs} runs ({os.cpu_count()} CPUs):")
    print(f"{'set-up':42s} {'wall ms':>8s} {'server CPU ms':>14s} {'client CPU ms':>14s} {'CPU ms in all':>14s}")
    for name, m in med.items():
        m["cpu_ms_total"] = round(m["server_cpu_ms"] + m["client_cpu_ms"], 2)
        print(
            f"{name:42s} {m['wall_ms']:8.1f} {m['server_cpu_ms']:14.1f} {m['client_cpu_ms']:14.1f} "
            f"{m['cpu_ms_total']:14.1f}"
        )
    ratios = {k: round(base[k] / now[k], 2) for k in ("wall_ms", "server_cpu_ms", "client_cpu_ms", "cpu_ms_total")}
    print(
        f"\nembedded vs MLflow's default server: wall {ratios['wall_ms']}x, server CPU {ratios['server_cpu_ms']}x, "
        f"client CPU {ratios['client_cpu_ms']}x, CPU in all {ratios['cpu_ms_total']}x less per child run"
    )
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_before": load0,
            "load_avg_after": os.getloadavg(),
        },
        "runs": a.runs,
        "repeats": a.repeats,
        "median": med,
        "raw": raw,
        "embedded_vs_default": ratios,
    }
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
