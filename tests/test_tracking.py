"""The embedded tracking default: a real MLflow server on 127.0.0.1 over SQLite, reused across jobs."""

from __future__ import annotations


import numpy as np
import pytest

from fewsound import tracking
from fewsound.config import cfg_hash, flatten, from_flat, override
from fewsound.errors import ConfigError


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlflow-home")
    uri = tracking.start_local_server(home=home, port=None)
    yield home, uri
    assert tracking.stop_local_server(home)


def test_server_is_reused_and_backed_by_sqlite(server):
    home, uri = server
    assert uri.startswith("http://127.0.0.1:")
    assert tracking.start_local_server(home=home) == uri  # second job: same server, no new process
    assert (home / "mlflow.db").exists()


def test_parent_child_runs_with_params_metrics_artifacts(server, tmp_path):
    _, uri = server
    parent = tracking.MlflowRun("test-tracking", uri=uri, run_name="sweep")
    child = tracking.MlflowRun("test-tracking", uri=uri, run_name="fit", parent_run_id=parent.run_id)
    child.log_params({f"p{i}": i for i in range(150)})  # more than one MLflow batch
    for step in range(3):
        child.log_metrics({"fit/loss": 1.0 / (step + 1)}, step=step)
    wav = tmp_path / "pred.wav"
    from fewsound.data.audio import save_audio

    save_audio(wav, np.zeros(100, np.float32) + 0.1, 22050)
    child.log_artifact(wav, "audio")
    child.end()
    parent.end()
    run = child.client.get_run(child.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.PARENT_TAG] == parent.run_id
    assert run.data.params["p149"] == "149"
    hist = child.client.get_metric_history(child.run_id, "fit/loss")
    assert [m.step for m in hist] == [0, 1, 2]
    assert [a.path for a in child.client.list_artifacts(child.run_id, "audio")] == ["audio/pred.wav"]


def test_server_store_is_sqlite_in_wal_mode(server):
    import sqlite3

    home, _ = server
    with sqlite3.connect(home / "mlflow.db") as db:  # WAL is a property of the file, set by the server's hook
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_run_writer_runs_read_back_like_client_runs(server, tmp_path):
    _, uri = server
    parent = tracking.MlflowRun("test-tracking", uri=uri, run_name="sweep")
    w = tracking.RunWriter(uri)
    rid = w.create(parent.experiment_id, "fit-1", {tracking.PARENT_TAG: parent.run_id, "fewsound.key": "k1"})
    assert parent.client.get_run(rid).info.status == "RUNNING"
    curve = [(s, 1.0 / (s + 1)) for s in range(0, 1500, 10)]  # with the other entities: more than one batch
    w.log(rid, params={f"p{i}": i for i in range(130)}, metrics={"psnr": 31.25, "pesq": 1.5},
          curves={"fit/loss_curve": curve}, tags={"fewsound.na.pesq": "too short"})
    wav = tmp_path / "gt.wav"
    from fewsound.data.audio import load_audio, save_audio

    save_audio(wav, np.linspace(-0.5, 0.5, 2205, dtype=np.float32), 22050)
    parent.client.log_artifact(rid, str(wav), "audio")  # artifacts still through the client (proxied upload)
    w.end(rid, "FINISHED")
    run = parent.client.get_run(rid)
    assert run.info.status == "FINISHED" and run.info.run_name == "fit-1" and run.info.end_time
    assert run.data.tags[tracking.PARENT_TAG] == parent.run_id and run.data.tags["fewsound.na.pesq"] == "too short"
    assert run.data.params["p129"] == "129" and len(run.data.params) == 130
    assert run.data.metrics["psnr"] == 31.25
    hist = parent.client.get_metric_history(rid, "fit/loss_curve")
    assert [(m.step, m.value) for m in hist] == curve
    back = parent.client.download_artifacts(rid, "audio/gt.wav", str(tmp_path / "dl"))
    np.testing.assert_allclose(load_audio(back, sr=None), np.linspace(-0.5, 0.5, 2205), atol=1e-6)
    failed = w.create(parent.experiment_id, "fit-2", {tracking.PARENT_TAG: parent.run_id})
    w.end(failed, "FAILED")
    assert parent.client.get_run(failed).info.status == "FAILED"
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="not found"):
        w.log("0" * 32, params={"a": 1})


def test_file_store_uri_is_refused(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        tracking.tracking_uri()


def test_config_flatten_round_trip_and_hash():
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Inner:
        widths: tuple[int, ...] = (48, 24, 12)
        grid: int = 10

    @dataclass(frozen=True)
    class Outer:
        inr: Inner = field(default_factory=Inner)
        lr: float = 5e-3

    cfg = Outer()
    flat = flatten(cfg)
    assert flat == {"inr.widths": [48, 24, 12], "inr.grid": 10, "lr": 5e-3}
    assert from_flat(Outer, flat) == cfg
    changed = override(cfg, **{"inr.grid": 5})
    assert changed.inr.grid == 5 and cfg_hash(changed) != cfg_hash(cfg)
    assert cfg_hash(Outer()) == cfg_hash(cfg)
    with pytest.raises(ConfigError, match="inr.gird"):
        override(cfg, **{"inr.gird": 5})
