"""Training data as numpy batches: random crops (augmented: fewsound.train.augment) peak-normalised, and the
deterministic validation crop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from fewsound.train.augment import Augment

if TYPE_CHECKING:
    pass


SILENCE_PEAK = 1e-6  # a crop quieter than this is left as is instead of being blown up by peak normalisation


def crop_batch(
    segments: np.ndarray, length: int, rng: np.random.Generator, augment: Augment | None = None
) -> torch.Tensor:
    """Random `length`-sample crops (uniform start) of stored segments [b, L], augmented when `augment` is given,
    each peak-normalised after that (as the paper's AudioDataset) -> float32 [b, length]."""
    segments = np.asarray(segments, dtype=np.float32)
    assert segments.ndim == 2 and segments.shape[1] >= length, (segments.shape, length)
    starts = rng.integers(0, segments.shape[1] - length + 1, size=len(segments))
    x = np.stack([s[a : a + length] for s, a in zip(segments, starts)])
    if augment is not None:
        x = augment(x, rng)
    return torch.from_numpy(peak_normalize_batch(x))


def peak_normalize_batch(x: np.ndarray) -> np.ndarray:
    """x / max|x| per row; a (near-)silent row is left unscaled rather than amplified to noise."""
    peak = np.abs(x).max(axis=1, keepdims=True)
    return (x / np.where(peak < SILENCE_PEAK, 1.0, peak)).astype(np.float32)


def validation_crop(segments: np.ndarray, length: int) -> np.ndarray:
    """The deterministic validation view: the first `length` samples, peak-normalised. [V, L] -> [V, length]."""
    return peak_normalize_batch(np.asarray(segments, dtype=np.float32)[:, :length])


def random_batches(
    segments: np.ndarray,
    batch_size: int,
    length: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    augment: Augment | None = None,
) -> Iterator[torch.Tensor]:
    """Endless stream of this rank's share of global batches of random crops from in-memory segments [n, L].

    Sampling as the code's RandomSampler(num_samples=...): back-to-back random permutations of the segments.
    Every rank draws the same global batch order (seeded) and takes rows rank::world_size of each batch, so the
    W shares of a step are exactly the global batch one process would see (used by the DDP test and benchmarks;
    the Ray job streams from Ray Data instead).
    """
    assert batch_size % world_size == 0, (batch_size, world_size)
    order_rng = np.random.default_rng([seed, 0])
    crop_rng = np.random.default_rng([seed, 1])
    pool: list[int] = []
    while True:
        while len(pool) < batch_size:
            pool.extend(order_rng.permutation(len(segments)).tolist())
        idx, pool = pool[:batch_size], pool[batch_size:]
        batch = crop_batch(segments[idx], length, crop_rng, augment)
        yield batch[rank::world_size]
