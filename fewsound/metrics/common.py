"""Pieces every metric module shares: the batch convention, "not applicable" results, resampling, a process pool.

A metric takes references and reconstructions as `[B, N]` (or `[N]`) numpy arrays or torch tensors of the same
shape and returns one value per clip. Where a metric cannot be computed for a clip (PESQ on a clip without speech,
STOI on a clip that is silent after voice-activity trimming) the clip's entry is a `NotApplicable` carrying the
reason, never a silent NaN or 0.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

# The paper's code resampled with librosa 0.9.2's default, `kaiser_best` (resampy). librosa 0.11 defaults to
# soxr, so we name it explicitly: PESQ/CDPAM numbers stay comparable with the paper's.
PAPER_RES_TYPE = "kaiser_best"


@dataclass(frozen=True)
class NotApplicable:
    """A metric that does not apply to one clip, and why (e.g. 'no utterance detected')."""

    reason: str


def as_batch(x, name: str = "x") -> np.ndarray:
    """Any `[N]` / `[B, N]` array or tensor -> float64 numpy `[B, N]` (CPU, detached)."""
    if hasattr(x, "detach"):  # torch tensor, possibly on CUDA
        x = x.detach().to("cpu").double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    assert x.ndim == 2, f"{name}: expected [N] or [B, N], got shape {x.shape}"
    return x


def check_pair(refs: np.ndarray, recs: np.ndarray) -> None:
    assert refs.shape == recs.shape, f"refs {refs.shape} and recs {recs.shape} differ in shape"


def resample_paper(x: np.ndarray, orig_sr: int, sr: int) -> np.ndarray:
    """Resample `x: [B, N]` along time as the paper did: librosa.resample(res_type='kaiser_best') (resampy).

    Rows are independent, so one batched call equals B single calls exactly. Returns float32 `[B, M]`.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if orig_sr == sr:
        return x
    import librosa

    return np.ascontiguousarray(librosa.resample(x, orig_sr=orig_sr, target_sr=sr, res_type=PAPER_RES_TYPE, axis=-1))


def make_pool(workers: int) -> Executor | None:
    """A process pool for the CPU-bound per-pair metrics (PESQ holds the GIL in its C code, so threads do not help).

    `workers <= 1` -> None (compute in this process). Workers come from a forkserver that has already imported
    the metric modules, so each one starts in milliseconds without importing torch again, and without forking a
    parent whose torch/OpenMP threads may be mid-operation.
    """
    if workers <= 1:
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fewsound.metrics.pesq", "fewsound.metrics.stoi"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def map_pairs(fn, *iterables, pool: Executor | None = None, workers: int = 1):
    """`map(fn, *iterables)` in `pool` if given (results in order; submitted at once, so work overlaps with
    whatever the caller does before consuming the iterator), else lazily in this process."""
    if pool is None:
        return map(fn, *iterables)
    n = len(iterables[0])
    return pool.map(fn, *iterables, chunksize=max(1, n // (4 * max(workers, 1))))
