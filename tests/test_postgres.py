"""PostgreSQL as the tracking store, tested: a real PostgreSQL server (tests/postgres.py: a private cluster of
Debian's `postgresql` binaries), the cluster's MLflow server on it (`python -m fewsound mlflow serve --store
postgresql://...`, as cluster.yaml starts the head's server), and a real sweep and its re-run against it:
`jobs/fit_inrs.py --smoke-test`'s main() in this process (as tests/test_sweep.py runs it), on one local Ray
started for the test, so the two runs share its start-up.

The binaries must be installed (CI: scripts/ensure_postgres.sh): without them this test fails, saying what to
install, rather than skipping.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from postgres import LocalPostgres  # tests/postgres.py (tests/ is on sys.path)
from sweep_jobs import job  # tests/sweep_jobs.py

from fewsound import tracking
from tune.spine import FIT_KEY_TAG

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "fit_inrs-postgres"
SWEEP = ["--smoke-test", "--clips", "1", "--experiment", EXPERIMENT]


@pytest.fixture
def postgres(tmp_path):
    with LocalPostgres(tmp_path / "postgres.log") as pg:
        yield pg


def spawn_server(postgres: LocalPostgres, processes, folder: Path) -> tuple[str, Callable[[], None]]:
    """`python -m fewsound mlflow serve` on the PostgreSQL store, as cluster.yaml starts it on the head: its URI
    and a function that waits until it answers."""
    port = tracking._free_port()
    cmd = [sys.executable, "-m", "fewsound", "mlflow", "serve", "--store", postgres.uri(), "--artifacts",
           str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    log_path = folder / "serve.log"
    with open(log_path, "wb") as log:
        proc = processes.start(cmd, stdout=log, stderr=log, cwd=folder, env=dict(os.environ, PYTHONPATH=str(REPO)))
    uri = f"http://127.0.0.1:{port}"

    def wait() -> None:
        deadline = time.monotonic() + 180  # its first start creates MLflow's tables (migrations) in PostgreSQL
        while (why := tracking.server_health(uri)) is not None:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{uri}: {why}; {log_path.read_text()[-3000:]}"
            time.sleep(0.5)

    return uri, wait


@pytest.fixture
def sweep(postgres, processes, tmp_path, monkeypatch):
    """(server URI, run): `run()` runs `jobs/fit_inrs.py SWEEP` in this process against the server (its home:
    tmp_path/home) and returns (exit code, output). Ray starts once, after the environment is set (its workers
    inherit it), while the server starts."""
    import ray

    from tune.ray_env import init_ray, quiet_defaults

    uri, wait = spawn_server(postgres, processes, tmp_path)
    monkeypatch.setenv("FEWSOUND_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("FEWSOUND_STORAGE", raising=False)
    ray.shutdown()  # a Ray another module left in this process: its workers have another FEWSOUND_HOME
    quiet_defaults()
    init_ray(num_cpus=2)
    fit_inrs = job("fit_inrs")

    def run() -> tuple[int, str]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = fit_inrs.main(SWEEP)
        return rc, buf.getvalue()

    try:
        wait()
        yield uri, run
    finally:
        ray.shutdown()


def test_a_sweep_and_its_rerun_on_a_postgresql_store(postgres, sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    serve, run = sweep
    rc, out = run()
    assert rc == 0, out[-5000:]
    assert "2 fits: 2 done now, 0 already finished, 0 failed" in out, out[-3000:]

    # the runs are in PostgreSQL: MLflow's client reads them from the database itself, not through the server
    store = MlflowClient(tracking_uri=postgres.uri())
    exp = store.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    runs = store.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if tracking.PARENT_TAG not in r.data.tags]
    kids = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id]
    assert len(kids) == 2 and all(r.info.status == "FINISHED" for r in kids), [r.info.status for r in kids]
    assert {r.data.tags["fewsound.family"] for r in kids} == {"nerf", "kan"}
    assert all("eval/pesq" in r.data.metrics for r in kids)
    over_http = MlflowClient(tracking_uri=serve)
    files = {a.path for a in over_http.list_artifacts(kids[0].info.run_id, "audio")}
    assert files >= {"audio/pred.flac"}, files  # the artifacts went through the same server

    # the re-run fits nothing; its fit records are deleted first, so what it knows comes from PostgreSQL
    shutil.rmtree(tmp_path / "home" / "records")
    rc, out = run()
    assert rc == 0, out[-5000:]
    assert "2 fits: 2 already finished, 0 to run" in out, out[-3000:]
    assert "2 fits: 0 done now, 2 already finished, 0 failed" in out, out[-3000:]
    after = store.search_runs([exp.experiment_id], f"tags.`{tracking.PARENT_TAG}` = '{parent.info.run_id}'")
    assert sorted(r.data.tags[FIT_KEY_TAG] for r in after) == sorted(r.data.tags[FIT_KEY_TAG] for r in kids)
    assert {r.info.run_id for r in after} == {r.info.run_id for r in kids}  # not one run more
