"""The trained model a training run logs to MLflow: a PyTorch model in MLflow's "pt2" format (torch.export's
graph and weights), which `mlflow.pytorch.load_model` loads with MLflow's default refusal to unpickle code, and
which reconstructs as the trained model does, at any batch size. A real MLflow server; the real tiny FewSound."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fewsound.hyper import HyperConfig, build_model
from fewsound.tracking import MlflowRun


def test_the_final_model_is_pickle_free_and_loads_with_mlflows_defaults(env, speech_clips, monkeypatch, tmp_path):
    import mlflow.pytorch

    from tune.hyper.worker import _log_final_model

    _, uri = env
    clips = np.stack([c.load()[11_025 : 11_025 + 2048] for c in speech_clips[:3]]).astype(np.float32)
    model = build_model(HyperConfig(target="kan", preset="tiny", clip_length=2048), verbose=False)
    run = MlflowRun("test-final-model", uri=uri)
    _log_final_model(run, model, uri, clips[:2])
    run.end()
    (logged,) = [m for m in run.client.search_logged_models([run.experiment_id]) if m.source_run_id == run.run_id]
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged.model_uri, dst_path=str(tmp_path)))
    files = sorted(p.name for p in (local / "data").iterdir())
    assert files == ["model.pt2"], files  # no pickled model.pth beside it
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)  # MLflow's default: refuse pickle
    loaded = mlflow.pytorch.load_model(logged.model_uri)
    with torch.no_grad():  # a batch of 3 where the example had 2: the batch size is not baked in
        assert torch.equal(loaded(torch.from_numpy(clips)), model(torch.from_numpy(clips)))
    assert {a.path for a in run.client.list_artifacts(run.run_id)} >= {"model_file"}
