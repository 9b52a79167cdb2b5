"""STOI (Taal et al. 2010) and extended STOI through the `pystoi` package, at the clip's own sample rate.

As in the paper's code (torchmetrics ShortTimeObjectiveIntelligibility(fs=22050) -> pystoi), the signals go to
pystoi unresampled; pystoi resamples to 10 kHz itself. When fewer than 30 frames remain after pystoi's silent-frame
removal, pystoi only warns and returns 1e-5 - a silent wrong number. We turn that case into `NotApplicable`.
"""

from __future__ import annotations

import warnings

import numpy as np

from fewsound.metrics.common import NotApplicable, as_batch, check_pair, map_pairs


def stoi_pair(ref: np.ndarray, rec: np.ndarray, sr: int, extended: bool = False) -> float | NotApplicable:
    """(E)STOI of one pair `[N]` at `sr`. Top-level so that pool workers can run it."""
    from pystoi import stoi

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(stoi(ref, rec, sr, extended=extended))
    if any("Not enough STFT frames" in str(w.message) for w in caught):
        return NotApplicable("under 30 non-silent STOI frames (~384 ms of speech) in the reference")
    return value


def stoi_scores(refs, recs, sr: int, extended: bool = False, pool=None, workers: int = 1):
    """STOI per clip: an iterator of B floats / NotApplicable (lazy; consume it with list())."""
    x, y = as_batch(refs, "refs"), as_batch(recs, "recs")
    check_pair(x, y)
    # float32 like the paper's tensors (pystoi keeps the dtype through its resampling).
    x, y = x.astype(np.float32), y.astype(np.float32)
    return map_pairs(stoi_pair, list(x), list(y), [sr] * len(x), [extended] * len(x), pool=pool, workers=workers)
