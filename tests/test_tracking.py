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
    w.log(
        rid,
        params={f"p{i}": i for i in range(130)},
        metrics={"psnr": 31.25, "pesq": 1.5},
        curves={"fit/loss_curve": curve},
        tags={"fewsound.na.pesq": "too short"},
    )
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


def _pack_of_runs(parent: str, n: int) -> list[dict]:
    return [
        {
            "run_name": f"fit-{i}",
            "tags": {tracking.PARENT_TAG: parent, "fewsound.key": f"k{i}"},
            "params": {"lr": "0.005", "seed": str(i)},
            "metrics": {"psnr": 30.0 + i, "mse": 1e-3},
            "curves": {"fit/loss_curve": [(0, 1.0), (10, 0.25), (20, 0.5)]} if i == 0 else {},
            "status": "RUNNING" if i == 0 else "FINISHED" if i % 2 else "FAILED",
        }
        for i in range(n)
    ]


def _check_pack(client, ids: list[str], parent: str) -> None:
    assert len(set(ids)) == len(ids)
    for i, rid in enumerate(ids):
        run = client.get_run(rid)
        assert run.info.run_name == f"fit-{i}" and run.data.tags["fewsound.key"] == f"k{i}"
        assert run.info.status == ("RUNNING" if i == 0 else "FINISHED" if i % 2 else "FAILED")
        assert (run.info.end_time is None) == (i == 0)
        assert run.data.params == {"lr": "0.005", "seed": str(i)}
        assert run.data.metrics["psnr"] == 30.0 + i
        assert run.info.artifact_uri.endswith(f"{rid}/artifacts")
    # MLflow's "latest" value of a curve is its last step, as MLflow computes it
    assert client.get_run(ids[0]).data.metrics["fit/loss_curve"] == 0.5
    assert [(m.step, m.value) for m in client.get_metric_history(ids[0], "fit/loss_curve")] == [
        (0, 1.0),
        (10, 0.25),
        (20, 0.5),
    ]
    found = client.search_runs(
        [client.get_run(ids[0]).info.experiment_id],
        filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent}' and attributes.status = 'FINISHED'"
        " and metrics.psnr > 30.5",
    )
    assert sorted(r.info.run_id for r in found) == sorted(ids[i] for i in range(1, len(ids), 2))


def test_write_runs_writes_a_pack_in_one_request(server, tmp_path):
    from mlflow.exceptions import MlflowException

    _, uri = server
    parent = tracking.MlflowRun("test-bulk", uri=uri, run_name="sweep")
    w = tracking.RunWriter(uri)
    runs = _pack_of_runs(parent.run_id, 5)
    ids = w.write_runs(parent.experiment_id, runs)
    assert w._bulk  # fewsound's endpoint answered (no fallback)
    _check_pack(parent.client, ids, parent.run_id)
    # artifacts, then the final status: the run is FINISHED with its files
    (tmp_path / "a.txt").write_text("x")
    parent.client.log_artifact(ids[0], str(tmp_path / "a.txt"), "audio")
    w.end_runs({ids[0]: "FINISHED"})
    run = parent.client.get_run(ids[0])
    assert run.info.status == "FINISHED" and run.info.end_time
    assert [a.path for a in parent.client.list_artifacts(ids[0], "audio")] == ["audio/a.txt"]
    # a retried request (same client-chosen run ids) does not write its runs twice
    again = w.write_runs(parent.experiment_id, [dict(r, run_id=i) for r, i in zip(runs, ids)])
    assert again == ids
    assert len(parent.client.search_runs([parent.experiment_id], max_results=100)) == 1 + 5
    with pytest.raises(MlflowException, match="status"):
        w.write_runs(parent.experiment_id, [dict(runs[1], status="DONE")])
    with pytest.raises(MlflowException, match="no such run"):
        w.end_runs({"f" * 32: "FINISHED"})
    with pytest.raises(MlflowException, match="99999"):  # MLflow's own 404 is an error, not "no endpoint"
        w.write_runs("99999", runs[:1])
    assert w._bulk


def test_write_runs_falls_back_to_mlflows_api_on_a_plain_server(tmp_path):
    """Any other MLflow server (a cluster's, without fewsound's app): the same runs, three REST calls each."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    port = tracking._free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'db.sqlite'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not tracking._healthy(uri):
            assert proc.poll() is None and time.monotonic() < deadline, "plain mlflow server did not start"
            time.sleep(0.5)
        parent = tracking.MlflowRun("test-bulk", uri=uri, run_name="sweep")
        w = tracking.RunWriter(uri)
        ids = w.write_runs(parent.experiment_id, _pack_of_runs(parent.run_id, 5))
        assert not w._bulk  # the server said 404 to the bulk endpoint: MLflow's own API from then on
        _check_pack(parent.client, ids, parent.run_id)
        w.end_runs({ids[0]: "FINISHED"})
        assert parent.client.get_run(ids[0]).info.status == "FINISHED"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)


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
