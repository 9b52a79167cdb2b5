"""A trained hypernetwork loaded from wherever a training left it: a model file, a checkpoint folder, a run's
storage folder, or an MLflow run id."""

from __future__ import annotations

from pathlib import Path

from fewsound.errors import ConfigError

MODEL_FILE = "fewsound_model.pt"


def is_run_id(source: str) -> bool:
    """Whether `source` reads as an MLflow run id (32 hex digits) rather than a path."""
    import re

    return re.fullmatch(r"[0-9a-f]{32}", source) is not None and not Path(source).exists()


def load_trained(source: str, *, tracking: str | None = None):
    """A trained model from: a fewsound model file (save_model), a training checkpoint folder, a run's storage
    folder (its latest epoch_* checkpoint), or an MLflow run id (its model_file artifact)."""
    from fewsound.hyper import load_model
    from fewsound.train import STATE_FILE, model_from_training_state

    p = Path(source).expanduser()
    if p.is_file():
        return load_model(p)
    if p.is_dir():
        if (p / STATE_FILE).exists():
            return model_from_training_state(p)
        epochs = sorted(q for q in p.glob("epoch_*") if (q / STATE_FILE).exists())
        if epochs:
            return model_from_training_state(epochs[-1])
        raise ConfigError(source, "folder holds no training checkpoint (train_state.pt) nor epoch_* checkpoints")
    if is_run_id(source):
        import mlflow.artifacts

        from fewsound.tracking import tracking_uri

        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=source, artifact_path=f"model_file/{MODEL_FILE}", tracking_uri=tracking or tracking_uri()
            )
        except Exception as e:  # noqa: BLE001 - an unknown run or a run without the artifact is the user's input
            raise ConfigError(source, f"MLflow run has no model_file/{MODEL_FILE} ({type(e).__name__})") from None
        return load_model(local)
    raise ConfigError(source, "not a model file, a checkpoint folder, nor an MLflow run id")
