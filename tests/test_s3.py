"""Object storage end to end: a real S3-compatible server (moto, tests/s3.py) holds the corpus, Ray's storage and
MLflow's artifacts and history backup; the jobs run as a user runs them, against a Ray head of their own.

The driver and the Ray workers share no local folder: the head (and so every worker) has its own FEWSOUND_HOME
and working directory, the driver another; the corpus, checkpoints and artifacts are only in the bucket. The
MLflow server is `python -m fewsound mlflow serve` (SQLite backed up to the bucket); stopping it, deleting its
SQLite file and starting it again is what `ray down`/`ray up` does to the head, and the re-run of a sweep after
that skips every fit that had finished.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from s3 import MotoS3  # tests/s3.py (tests/ is on sys.path)
from support import REPO, VENV_BIN, RayHead, free_port, kill_tree  # tests/support.py

pytestmark = pytest.mark.system

BUCKET = "fewsound"
INR_CORPUS = f"s3://{BUCKET}/corpora/inr"
TRAIN_CORPUS = f"s3://{BUCKET}/corpora/fewsound"
BACKUP = f"s3://{BUCKET}/fewsound/mlflow.db"
ARTIFACTS = f"s3://{BUCKET}/fewsound/mlflow-artifacts"


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


class Serve:
    """`python -m fewsound mlflow serve ...` as cluster.yaml runs it on the head (here on 127.0.0.1)."""

    def __init__(self, env: dict, store: Path, port: int, log: Path):
        self.env, self.store, self.port, self.log_path = env, store, port, log
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> Serve:
        return self.spawn().wait_healthy()

    def spawn(self) -> Serve:
        """Start the server without waiting for it (the fixture starts the Ray head meanwhile)."""
        cmd = [sys.executable, "-m", "fewsound", "mlflow", "serve", "--store", str(self.store), "--backup", BACKUP,
               "--artifacts", ARTIFACTS, "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]  # fmt: skip
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def wait_healthy(self) -> Serve:
        deadline = time.monotonic() + 120
        while not _healthy(self.uri):
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log_path.read_text()[-3000:]
            time.sleep(0.5)
        return self

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)  # what a scheduler or `docker stop` sends: final backup, then exit
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:  # never left running (its gunicorn included)
            return kill_tree(self.proc)
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """moto + `fewsound mlflow serve` + a Ray head whose workers have their own FEWSOUND_HOME and cwd.
    Yields (driver env, driver home, worker home, MotoS3, Serve, root)."""
    root = tmp_path_factory.mktemp("cloud")
    with MotoS3(root / "moto.log") as s3:
        s3.create_bucket(BUCKET)
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        base.update(s3.env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
                    OMP_NUM_THREADS="1", PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # fmt: skip
        (root / "server").mkdir()
        serve = Serve(dict(base, FEWSOUND_HOME=str(root / "server-home")), root / "server" / "mlflow.db",
                      free_port(), root / "serve.log")  # fmt: skip
        worker_home, driver_home = root / "worker-home", root / "driver-home"
        (root / "node").mkdir()
        (root / "user").mkdir()
        head = None
        try:
            serve.spawn()  # it starts while the head does
            # RAY_memory_monitor_refresh_ms=0: no Ray OOM killer on this test head. It acts on the whole machine's
            # memory, which CI and development machines share with other work; the kernel still guards the machine.
            # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM the head stops at once. By default it first drains
            # for up to 30 s, and a head that ran these jobs never finishes draining: it waited the whole 30 s.
            node_env = dict(base, FEWSOUND_HOME=str(worker_home), RAY_memory_monitor_refresh_ms="0",
                            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # fmt: skip
            head = RayHead(root / "node", node_env, extra=["--num-cpus", "2", "--num-gpus", "0"], dashboard=False)
            address = head.start().gcs
            serve.wait_healthy()
            driver = dict(base, FEWSOUND_HOME=str(driver_home), RAY_ADDRESS=address, MLFLOW_TRACKING_URI=serve.uri,
                          FEWSOUND_STORAGE=f"s3://{BUCKET}/ray")  # fmt: skip
            yield driver, driver_home, worker_home, s3, serve, root
        finally:
            if head is not None:
                head.stop()
            if getattr(serve, "proc", None) is not None and serve.proc.poll() is None:
                serve.stop()


def _job(env: dict, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return p


@pytest.fixture(scope="module")
def inr_corpus(cloud):
    """`jobs/prepare_data.py --out s3://...` run as the user runs it (from a folder of their own)."""
    driver, _, _, _, _, root = cloud
    p = _job(driver, root / "user", str(REPO / "jobs/prepare_data.py"), "--protocol", "inr-1.5s", "--out", INR_CORPUS,
             "--shard-size", "16")  # fmt: skip
    return p


def test_prepare_data_writes_the_corpus_to_the_bucket_and_resumes(cloud, inr_corpus):
    driver, _, _, s3, _, root = cloud
    p = inr_corpus
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr and f"output {INR_CORPUS}" in p.stdout
    assert not any(x.name.startswith("s3") for x in (root / "user").iterdir())  # no local folder named "s3:"
    keys = s3.keys(BUCKET, "corpora/inr/")
    shards = [k for k in keys if k.endswith(".parquet")]
    assert "corpora/inr/manifest.json" in keys and len(shards) >= 2, keys
    assert sorted(k for k in keys if "/receipts/" in k) == sorted(
        k.replace("corpora/inr/", "corpora/inr/receipts/").replace(".parquet", ".json") for k in shards
    )
    from fewsound.data.corpus import open_corpus

    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env.items():
            mp.setenv(k, v)
        corpus = open_corpus(INR_CORPUS, verify=True)  # every shard's sha256 matches the manifest
        assert len(corpus) >= 10 and {c.kind for c in corpus.infos()} == {"speech", "music", "environment"}
        speech = [c for c in corpus.infos() if c.kind == "speech"]
        assert corpus.clip(speech[-1].clip_id).audio.shape == (32_768,)
    # the same command again keeps every shard (receipts + checksums read back from the bucket)
    again = _job(driver, root / "user", str(REPO / "jobs/prepare_data.py"), "--protocol", "inr-1.5s", "--out",
                 INR_CORPUS, "--shard-size", "16")  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("kept (complete from an earlier run)") == len(shards)


def _children(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:  # a store without the sweep's history
        return []
    return [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def test_sweep_on_the_bucket_and_history_survives_a_new_head(cloud, inr_corpus):
    """fit_inrs --smoke-test reads the corpus from the bucket and writes Ray's storage and the artifacts there;
    the driver's home stays empty and the workers' home holds no corpus. Then the head is "replaced": the server
    stops (final backup), its SQLite file is deleted, a new server restores it, and the re-run fits nothing."""
    driver, driver_home, worker_home, s3, serve, root = cloud
    assert inr_corpus.returncode == 0, inr_corpus.stderr[-2000:]
    args = (str(REPO / "jobs/fit_inrs.py"), "--smoke-test", "--clips", "1", "--corpus", INR_CORPUS)
    p = _job(driver, root / "user", *args)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    assert "2 fits: 2 done now, 0 already finished, 0 failed" in out, out[-3000:]
    kids = _children(serve.uri, "fit_inrs-smoke")
    assert len(kids) == 2 and all(r.info.status == "FINISHED" for r in kids), [r.info.status for r in kids]

    keys = s3.keys(BUCKET)
    for r in kids:  # every child run's audio and spectrogram, and its target (on the parent run), are objects in
        # the bucket (the server's proxy)
        mine = [k for k in keys if k.startswith("fewsound/mlflow-artifacts/") and r.info.run_id in k]
        assert any(k.endswith("audio/pred.flac") for k in mine) and any(k.endswith("spectrogram.png") for k in mine)
        parent, target = r.data.tags["mlflow.parentRunId"], r.data.tags["fewsound.target_audio"]
        assert any(parent in k and k.endswith(target) for k in keys), (target, keys)
    assert any(k.startswith("ray/ray_results/") for k in keys), keys  # Ray Tune's experiment state
    records = [k for k in keys if k.startswith("ray/records/fit_inrs-smoke/") and k.endswith("/record.json")]
    assert len(records) == 2, keys  # each fit's record (fewsound.records), kept in the bucket before it was logged
    assert not driver_home.exists() or not any(driver_home.rglob("*")), list(driver_home.rglob("*"))
    assert not (worker_home / "corpora").exists()  # trials read the bucket, not a local copy

    # "ray down": the server stops (SIGTERM: last backup), the head's disk is gone; "ray up": a new server
    assert serve.stop() == 0
    assert "backed up" in serve.log_path.read_text()
    assert "fewsound/mlflow.db" in s3.keys(BUCKET, "fewsound/")
    for f in serve.store.parent.iterdir():
        f.unlink()
    serve.start()
    assert f"restored {serve.store} from {BACKUP}" in serve.log_path.read_text()

    # the restored store itself holds the history, before anything re-runs: the same runs, ids, metrics
    def history() -> dict:
        return {
            r.info.run_id: (r.info.status, r.info.run_name, r.data.metrics)
            for r in _children(serve.uri, "fit_inrs-smoke")
        }

    restored = history()
    assert restored == {r.info.run_id: (r.info.status, r.info.run_name, r.data.metrics) for r in kids}, restored
    again = _job(driver, root / "user", *args)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-5000:]
    assert "2 fits: 0 done now, 2 already finished, 0 failed" in out, out[-3000:]
    assert history() == restored  # found finished in the restored history: nothing re-logged from the bucket


def test_training_smoke_reads_and_checkpoints_in_the_bucket(cloud):
    driver, driver_home, worker_home, s3, serve, root = cloud
    p = _job(driver, root / "user", str(REPO / "jobs/prepare_data.py"), "--protocol", "fewsound", "--out",
             TRAIN_CORPUS, "--shard-size", "16")  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    t = _job(driver, root / "user", str(REPO / "jobs/train_fewsound.py"), "--smoke-test", "--corpus", TRAIN_CORPUS)
    out = t.stdout + t.stderr
    assert t.returncode == 0, out[-5000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=serve.uri)
    exp = client.get_experiment_by_name("train_fewsound-smoke")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["data.corpus"] == TRAIN_CORPUS
    assert run.data.params["ray.storage"].startswith(f"s3://{BUCKET}/ray/")
    keys = s3.keys(BUCKET)
    assert any(k.startswith("ray/train/") and "checkpoint" in k for k in keys), [k for k in keys if "ray/" in k]
    assert any(k.startswith("fewsound/mlflow-artifacts/") and run.info.run_id in k and "model_file" in k for k in keys)
    assert not driver_home.exists() or not any(driver_home.rglob("*")), list(driver_home.rglob("*"))
    assert not (worker_home / "corpora").exists()
