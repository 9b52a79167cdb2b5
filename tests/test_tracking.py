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
