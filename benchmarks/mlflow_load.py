"""The cluster's MLflow tracking server under the load of a sweep at cluster.yaml's ceiling: as many trials as the
cluster runs at once, all logging their fits at the same time, against the SQLite store (fewsound's embedded and
cluster default) and a real PostgreSQL server.

    python benchmarks/mlflow_load.py [--trials N] [--runs-per-trial 10] [--stores sqlite:1,sqlite:2,postgresql:2]

Trials at once: by default the ceiling of cluster.yaml, derived as a sweep derives it: cluster.yaml's
FEWSOUND_MAX_GPUS / FEWSOUND_MAX_CPUS (its docker run_options) give the cluster's capacity
(tune.ray_env.capacity), one trial asks for trial_resources (1/4 GPU + 1 CPU by default), and trial_slots is how
many fit at once (min of GPUs / 1/4 and CPUs / 1).

Each trial logs its fits exactly as a sweep's trial does (tune/sweep/record.py log_records): fit records written to
the sweep's storage first (fewsound.records, with the files a fit has: audio/gt.wav, audio/pred.wav, a
spectrogram PNG, and a loss curve on one fit in ten packs), then, pack by pack, one search for the pack's runs
(tune.sweep.durable.runs_by_key) and each record replayed as one child run (tune.sweep.durable.replay:
create_run with its tags, one log_batch of params + metrics (+ curve), the artifact uploads, set_terminated) by
LOG_THREADS threads.
The records are written before the clock starts; what is timed is the logging only. The trials run in
`--procs` processes (threads inside: a process per trial would take gigabytes on a small machine), each
process with its own MLflow client, all released at once.

The server is `python -m fewsound mlflow serve` (the cluster's server, fewsound/mlflow_gunicorn.py's settings)
with `--workers W`, on each store in turn:
  sqlite:W       a SQLite file in WAL mode (what cluster.yaml and the embedded server use; sqlite:1 is the
                 embedded server's command exactly)
  postgresql:W   a private PostgreSQL cluster (tests/postgres.py: Debian's binaries, PostgreSQL's default
                 durability: every commit flushed) on 127.0.0.1
Reported per store: runs/s (child runs completed per second of wall time), errors (none allowed: any failed
request (the clients do not retry, so a "database is locked" shows), a missing, duplicated or unfinished run,
an error line in the server's log), server CPU (psutil over the server's process tree; for PostgreSQL also the
database's processes) per run and in cores. Everything runs on this machine: clients, server and database share
its cores, so runs/s is what this machine sustains; server CPU per run is what carries over to the cluster's head.

Prints a table and writes benchmarks/results/mlflow_load.json. All traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))  # tests/postgres.py: the private PostgreSQL cluster

STORES = "sqlite:1,sqlite:2,sqlite:4,postgresql:2,postgresql:4"
SWEEP = "load-bench"
EXPERIMENT = "mlflow-load"
SERVER_ERRORS = ("database is locked", "Traceback", "Exception on", "OperationalError", "WORKER TIMEOUT", "[ERROR]")


# --------------------------------------------------------------------------------------------- the workload


def ceiling(cluster_yaml: Path = REPO / "cluster.yaml") -> tuple[int, str]:
    """Trials the cluster runs at once at its ceiling, and how that follows from cluster.yaml."""
    import yaml

    env = {}
    for item in yaml.safe_load(cluster_yaml.read_text())["docker"]["run_options"]:
        words = shlex.split(item)
        if words[0] == "--env":
            k, v = words[1].split("=", 1)
            env[k] = v
    saved = {k: os.environ.get(k) for k in ("FEWSOUND_MAX_GPUS", "FEWSOUND_MAX_CPUS")}
    try:
        os.environ.update({k: env[k] for k in saved})
        from tune.ray_env import capacity, fraction_text, trial_resources, trial_slots

        cap = capacity({})
        res = trial_resources(cap)
        n = trial_slots(cap, res)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    why = (f"cluster.yaml: FEWSOUND_MAX_GPUS={env['FEWSOUND_MAX_GPUS']}, FEWSOUND_MAX_CPUS={env['FEWSOUND_MAX_CPUS']};"
           f" one trial asks for {fraction_text(res)}; trial_slots = min({cap.gpus:g} / {res.get('gpu', 0):g}, "
           f"{cap.cpus:g} / {res['cpu']:g}) = {n}")  # fmt: skip
    return n, why


def fit_files(folder: Path) -> dict[str, bytes]:
    """The files one fit stores (tune/sweep/record.py ARTIFACT_FILES) for a 1.5 s speech clip and its reconstruction."""
    import numpy as np

    from fewsound.data.audio import peak_normalize, save_audio
    from fewsound.data.builtin import builtin_corpus
    from fewsound.report import save_spectrogram_png

    sr = 22_050  # the paper's rate: 32,768 samples are its 1.5 s clips
    audio = next(x for c in builtin_corpus() if c.kind == "speech" and len(x := c.load(sr)) >= 32_768)
    ref = peak_normalize(np.asarray(audio[:32_768], dtype=np.float32))
    pred = ref + np.random.default_rng(0).normal(0, 0.01, ref.shape).astype(np.float32)
    save_audio(folder / "audio" / "gt.wav", ref, sr)
    save_audio(folder / "audio" / "pred.wav", pred, sr)
    save_spectrogram_png(folder / "plots" / "spectrogram.png", ref, pred, sr, title="bench")
    return {rel: (folder / rel).read_bytes() for rel in ("audio/gt.wav", "audio/pred.wav", "plots/spectrogram.png")}


def make_records(root: str, trials: int, runs: int, pack_size: int, files: dict[str, bytes]) -> list[list[list]]:
    """Write trials x runs fit records (tags, params, metrics as a sweep's trial writes them). Returns, per trial,
    its packs: [[(pack id, [key, ...]), ...], ...]."""
    from fewsound import records
    from fewsound.fit import FitConfig
    from fewsound.plan import FitTask
    from tune.spine import ATTEMPTS_TAG, FAMILY_TAG, FIT_KEY_TAG, LABEL_TAG, NODE_TAG, PACK_TAG, SWEEP_TAG

    metrics = {"fit/loss": 1e-3, "cost/seconds": 1.1, "cost/steps_per_s": 900.0, "model/params": 66_049.0,
               "eval/mse": 1e-3, "eval/psnr": 30.1, "eval/snr": 11.2, "eval/si_snr": 11.0, "eval/lsd": 1.2,
               "eval/wd_hf": 0.01, "eval/pesq": 1.6, "eval/stoi": 0.88, "eval/cdpam": 0.31}  # fmt: skip
    plan, n_packs = [], 0
    for t in range(trials):
        packs = []
        for p0 in range(0, runs, pack_size):
            pid, n_packs = f"t{t:03d}p{p0 // pack_size:02d}", n_packs + 1
            keys = []
            for i in range(p0, min(runs, p0 + pack_size)):
                task = FitTask(FitConfig(family="nerf", steps=10_000, seed=i), f"clip-{t:03d}-{i:04d}", "speech",
                               32_768, "NERF")  # fmt: skip
                tags = {FIT_KEY_TAG: task.key, SWEEP_TAG: SWEEP, PACK_TAG: pid, FAMILY_TAG: "nerf", LABEL_TAG: "NERF",
                        ATTEMPTS_TAG: "1", NODE_TAG: "0" * 56, "mlflow.source.git.commit": "0" * 40}  # fmt: skip
                curve = n_packs % 10 == 1 and i == p0  # tune/sweep/trial.py: the first fit of one pack in ten
                rec = records.FitRecord(
                    key=task.key,
                    sweep=SWEEP,
                    run_name=task.key,
                    tags=tags,
                    params={k: str(v) for k, v in task.params().items()},
                    metrics=dict(metrics, **{"eval/psnr": 30.0 + i / 100}),
                    status="FINISHED",
                    curves={"fit/loss_curve": [(s, 1.0 / (1 + s)) for s in range(0, 10_000, 100)]} if curve else {},
                )
                records.write_record(root, rec, files)
                keys.append(task.key)
            packs.append((pid, keys))
        plan.append(packs)
    return plan


def _trial(client, exp_id: str, root: str, parent: str, packs: list, errors: list, log_threads: int) -> int:
    """One trial's logging, pack after pack, as tune/sweep/record.py log_records does it. Returns runs created."""
    from concurrent.futures import ThreadPoolExecutor

    from fewsound import records
    from tune.spine import PACK_TAG, SWEEP_TAG, tag_filter
    from tune.sweep.durable import replay, runs_by_key

    made = 0
    for pid, keys in packs:
        try:
            runs = runs_by_key(client, exp_id, f"{tag_filter(SWEEP_TAG, SWEEP)} and {tag_filter(PACK_TAG, pid)}")
        except Exception as e:
            errors.append(f"search of pack {pid}: {type(e).__name__}: {e}"[:300])
            continue

        def one(key: str, runs: dict = runs) -> bool:
            try:
                rec = records.read_record(root, SWEEP, key)
                return replay(client, exp_id, root, rec, parent, runs.get(key, []))[1]
            except Exception as e:
                errors.append(f"{key}: {type(e).__name__}: {e}"[:300])
                return False

        with ThreadPoolExecutor(max_workers=log_threads) as pool:
            made += sum(pool.map(one, keys))
    return made


def writer(uri: str, exp_id: str, root: str, parent: str, trials: list, log_threads: int, retries: int,
           ready, go, out) -> None:  # fmt: skip
    """A writer process: its trials, each in a thread, released by `go`; puts (runs made, errors, CPU s) on `out`."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)  # a failed request is an error, not a retry
    os.environ["MLFLOW_HTTP_POOL_MAXSIZE"] = str(max(10, len(trials) * log_threads))  # a connection per thread
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    from mlflow.tracking import MlflowClient

    from tune.sweep.durable import client_defaults

    client_defaults()
    client = MlflowClient(tracking_uri=uri)
    client.get_experiment(exp_id)  # the session and its connection exist before the clock starts
    errors: list[str] = []
    made = [0] * len(trials)

    def run(i: int) -> None:
        made[i] = _trial(client, exp_id, root, parent, trials[i], errors, log_threads)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(trials))]
    ready.release()
    go.wait()
    cpu0 = time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((sum(made), errors, time.process_time() - cpu0))


# --------------------------------------------------------------------------------------------- the servers


class CpuMeter:
    """CPU seconds of a changing set of processes (a server's tree, the database's backends), sampled in a thread
    so that a process that exits meanwhile still counts with its last reading."""

    def __init__(self, pids_of, every: float = 0.25):
        self.pids_of, self.every = pids_of, every
        self.last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> float:
        import psutil

        for pid in self.pids_of():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                t = p.cpu_times()
                self.last[(pid, p.create_time())] = t.user + t.system
        return sum(self.last.values())

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> CpuMeter:
        self.start = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = self.sample() - self.start


def tree(pid: int) -> list[int]:
    import psutil

    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return []


@contextlib.contextmanager
def store(kind: str, folder: Path) -> Iterator[tuple[str, object]]:
    """(backend store URI, function listing the database's own processes) of a fresh store of `kind`."""
    if kind == "sqlite":
        yield str(folder / "mlflow.db"), list
    elif kind == "postgresql":
        from postgres import LocalPostgres

        with LocalPostgres(folder / "postgres.log", durable=True) as pg:
            yield pg.uri("mlflow"), pg.pids
    else:
        raise SystemExit(f"--stores: unknown store {kind!r}; use sqlite:W or postgresql:W")


@contextlib.contextmanager
def server(backend: str, workers: int, folder: Path) -> Iterator[tuple[str, int]]:
    """`python -m fewsound mlflow serve` (the cluster's server) on `backend`: (URI, pid of its process tree)."""
    from fewsound import tracking

    port = tracking._free_port()
    cmd = [sys.executable, "-m", "fewsound", "mlflow", "serve", "--store", backend, "--artifacts",
           str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(workers)]  # fmt: skip
    log = open(folder / "server.log", "wb")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while tracking.server_health(uri) is not None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


# --------------------------------------------------------------------------------------------- one store


def warm_up(client, exp_id: str, n: int) -> None:
    """A few runs at once under their own parent, so that every server worker has imported and connected."""
    from concurrent.futures import ThreadPoolExecutor

    from fewsound.tracking import PARENT_TAG, log_run

    parent = client.create_run(exp_id, run_name="warm-up").info.run_id
    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(lambda i: log_run(client, exp_id, run_name=f"warm-{i}", tags={PARENT_TAG: parent},
                                        params={"i": i}, metrics={"m": 1.0}), range(4 * n)))  # fmt: skip


def check(client, exp_id: str, parent: str, plan: list, folder: Path) -> list[str]:
    """What went wrong in the server's store: runs missing, duplicated or not FINISHED; a sample without its
    three files; error lines in the server's log."""
    from tune.spine import FIT_KEY_TAG, children_filter, search_runs

    wrong = []
    runs = search_runs(client, exp_id, children_filter(parent))
    expected = {k for packs in plan for _, keys in packs for k in keys}
    keys = [r.data.tags.get(FIT_KEY_TAG) for r in runs]
    if sorted(keys) != sorted(expected):
        wrong.append(f"{len(runs)} child runs ({len(set(keys))} keys) for {len(expected)} fits")
    if bad := [r.info.run_id for r in runs if r.info.status != "FINISHED"]:
        wrong.append(f"{len(bad)} runs not FINISHED")
    for r in runs[:: max(1, len(runs) // 8)]:
        files = {a.path for d in ("audio", "plots") for a in client.list_artifacts(r.info.run_id, d)}
        if len(files) != 3:
            wrong.append(f"run {r.info.run_id}: artifacts {sorted(files)}")
    log = (folder / "server.log").read_text(errors="replace").splitlines()
    wrong += [f"server log: {line[:200]}" for line in log if any(p in line for p in SERVER_ERRORS)][:20]
    return wrong


def one_store(kind: str, workers: int, plan: list, root: str, args) -> dict:
    from mlflow.tracking import MlflowClient

    from fewsound.tracking import get_or_create_experiment

    folder = Path(tempfile.mkdtemp(prefix=f"fewsound-load-{kind}-"))
    with contextlib.ExitStack() as clean:
        clean.callback(shutil.rmtree, folder, ignore_errors=True)
        backend, db_pids = clean.enter_context(store(kind, folder))
        uri, pid = clean.enter_context(server(backend, workers, folder))
        client = MlflowClient(tracking_uri=uri)
        exp_id = get_or_create_experiment(client, EXPERIMENT)
        warm_up(client, exp_id, 2 * workers)
        parent = client.create_run(exp_id, run_name=SWEEP, tags={"fewsound.sweep": SWEEP}).info.run_id
        ctx = mp.get_context("spawn")
        ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        shares = [plan[i :: args.procs] for i in range(args.procs)]
        procs = [ctx.Process(target=writer, args=(uri, exp_id, root, parent, s, args.log_threads, args.retries,
                                                  ready, go, out), daemon=True) for s in shares if s]  # fmt: skip
        for p in procs:
            p.start()
        for _ in procs:
            ready.acquire()
        with CpuMeter(lambda: tree(pid)) as server_cpu, CpuMeter(db_pids) as db_cpu:
            t0 = time.perf_counter()
            go.set()
            results = [out.get() for _ in procs]
            wall = time.perf_counter() - t0
        for p in procs:
            p.join()
        wrong = check(client, exp_id, parent, plan, folder)
    made = sum(r[0] for r in results)
    errors = [e for r in results for e in r[1]] + wrong
    n = sum(len(keys) for packs in plan for _, keys in packs)
    return {
        "store": kind,
        "workers": workers,
        "trials": len(plan),
        "runs": n,
        "runs_created": made,
        "wall_s": round(wall, 2),
        "runs_per_s": round(made / wall, 2),
        "errors": len(errors),
        "error_samples": errors[:10],
        "server_cpu_s": round(server_cpu.seconds, 2),
        "db_cpu_s": round(db_cpu.seconds, 2),
        "server_cpu_ms_per_run": round(1000 * (server_cpu.seconds + db_cpu.seconds) / max(1, made), 1),
        "server_cores": round((server_cpu.seconds + db_cpu.seconds) / wall, 2),
        "client_cpu_ms_per_run": round(1000 * sum(r[2] for r in results) / max(1, made), 1),
        "load_avg_after": os.getloadavg(),  # the machine is shared: how busy it was meanwhile
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=None, help="trials logging at once (default: cluster.yaml's ceiling)")
    ap.add_argument("--runs-per-trial", type=int, default=10, help="child runs each trial logs (default 10)")
    ap.add_argument("--pack-size", type=int, default=5, help="fits per pack: one search per pack (default 5)")
    ap.add_argument("--procs", type=int, default=8, help="writer processes the trials are spread over (default 8)")
    ap.add_argument("--log-threads", type=int, default=None, help="runs a trial logs at once (default LOG_THREADS)")
    ap.add_argument("--retries", type=int, default=0, help="client retries of a failed request (default 0: strict)")
    ap.add_argument("--stores", default=STORES, help=f"store:workers to run, in turn (default {STORES})")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "mlflow_load.json"))
    a = ap.parse_args()
    from tune.sweep.durable import LOG_THREADS

    a.log_threads = a.log_threads or LOG_THREADS
    n_ceiling, why = ceiling()
    trials = a.trials or n_ceiling
    print(f"ceiling: {n_ceiling} trials at once ({why})")
    print(f"load: {trials} trials x {a.runs_per_trial} runs (packs of {a.pack_size}, {a.log_threads} logging threads "
          f"each) from {a.procs} processes; {os.cpu_count()} CPUs here", flush=True)  # fmt: skip
    load0 = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fewsound-load-records-") as d:
        files = fit_files(Path(d) / "files")
        root = str(Path(d) / "records")
        plan = make_records(root, trials, a.runs_per_trial, a.pack_size, files)
        for spec in a.stores.split(","):
            kind, workers = spec.split(":")
            r = one_store(kind, int(workers), plan, root, a)
            rows.append(r)
            print(f"  {kind}:{workers}  {r['runs_created']} runs in {r['wall_s']} s  {r['runs_per_s']} runs/s  "
                  f"errors {r['errors']}  server CPU {r['server_cpu_ms_per_run']} ms/run", flush=True)  # fmt: skip
            for e in r["error_samples"][:3]:
                print(f"      {e}")
    print(f"\n{trials} trials logging at once, {a.runs_per_trial} runs each ({os.cpu_count()} CPUs, clients included):")
    print(f"{'store':12s} {'workers':>7s} {'runs/s':>7s} {'errors':>6s} {'server CPU ms/run':>17s} "
          f"{'(of it db)':>10s} {'server cores':>12s} {'client CPU ms/run':>17s}")  # fmt: skip
    for r in rows:
        db = f"{1000 * r['db_cpu_s'] / max(1, r['runs_created']):.1f}" if r["store"] == "postgresql" else "-"
        print(f"{r['store']:12s} {r['workers']:7d} {r['runs_per_s']:7.1f} {r['errors']:6d} "
              f"{r['server_cpu_ms_per_run']:17.1f} {db:>10s} {r['server_cores']:12.2f} "
              f"{r['client_cpu_ms_per_run']:17.1f}")  # fmt: skip
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_before": load0,
            "load_avg_after": os.getloadavg(),
        },  # fmt: skip
        "ceiling": {"trials": n_ceiling, "derivation": why},
        "load": {
            "trials": trials,
            "runs_per_trial": a.runs_per_trial,
            "pack_size": a.pack_size,
            "procs": a.procs,
            "log_threads": a.log_threads,
            "client_retries": a.retries,
            "artifact_bytes_per_run": sum(len(b) for b in files.values()),
        },  # fmt: skip
        "results": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
