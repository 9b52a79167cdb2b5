"""What every trial of a sweep is handed besides its packs (TrialContext), and what it reads through it: the
corpus's clips and the tracking server, each opened once per process."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from fewsound.data.audio import peak_normalize
from fewsound.plan import FitTask
from fewsound.storage import storage_root


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its pack (shared by every trial of a sweep)."""

    corpus: str  # where the clips are: a URI (s3://..., gs://...), a path every node mounts, or builtin:<protocol>
    experiment: str
    parent_run_id: str
    sweep: str
    tracking_uri: str
    max_retries: int = 1
    curve_every_n_packs: int = 10  # per-step curves only for a sample of fits (the UI slows with thousands)
    log_artifacts: bool = True  # audio/pred.flac, plots/spectrogram.png per fit; each clip's target once
    experiment_id: str | None = None  # resolved once by the driver (None: looked up by name, once per process)
    git_commit: str | None = None  # mlflow.source.git.commit of every child run (resolved once by the driver)
    # Which metrics of fewsound.metrics to compute (None: every metric of the paper that applies to the clip's
    # kind). A subset (e.g. ("mse",)) skips the costly ones (CDPAM, PESQ); benchmarks use it to isolate
    # orchestration. The child runs are logged either way.
    metrics: tuple[str, ...] | None = None
    records: str = ""  # where fit records are kept (fewsound.records); "": storage_root("records") of the worker
    # evaluate, record and log a pack while the next one fits (tune.sweep.trial.overlaps); None: where fits run on a GPU
    overlap_evaluation: bool | None = None

    @property
    def records_root(self) -> str:
        return self.records or storage_root("records")


@functools.lru_cache(maxsize=4)
def _corpus(corpus: str) -> Any:
    """The corpus, opened once per worker process; its clips are read when a pack needs them (row groups)."""
    from fewsound.data.corpus import open_corpus

    return open_corpus(corpus)


@functools.lru_cache(maxsize=4)
def tracking_client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@functools.lru_cache(maxsize=16)
def experiment_id_of(uri: str, experiment: str) -> str:
    from fewsound.tracking import get_or_create_experiment

    return get_or_create_experiment(tracking_client(uri), experiment)


def load_clip(corpus: str, clip_id: str, length: int) -> np.ndarray:
    """The first `length` samples of a stored clip, peak-normalised as in the paper."""
    clip = _corpus(corpus).clip(clip_id)
    x = clip.audio[:length]
    assert x.shape[0] == length, f"{clip_id}: stored {clip.audio.shape[0]} samples < requested {length}"
    return peak_normalize(np.asarray(x, dtype=np.float32), where=clip_id)


def pack_id(tasks: list[FitTask]) -> str:
    """A stable id of a pack (its fits' keys), tagged on its child runs so a retried trial finds its own."""
    from fewsound.config import cfg_hash

    return cfg_hash(sorted(t.key for t in tasks), 12)
