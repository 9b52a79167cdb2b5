"""PESQ (ITU-T P.862 / P.862.2) through the `pesq` package, as the paper computed it.

The paper's code resampled every clip from 22,050 Hz to 16 kHz with librosa.resample (kaiser_best / resampy under
its librosa 0.9.2) and scored wide-band PESQ (torchmetrics -> pesq). We do the same: one batched kaiser_best
resample of all clips (rows are independent, so it equals per-clip calls exactly), then `pesq.pesq(16000, ref,
rec, mode)` per pair. Narrow-band on request (`mode="nb"`, also at 16 kHz).

A reference in which PESQ detects no utterance (silence, non-speech) or a clip under 1/4 s gives a
`NotApplicable` with the package's reason instead of an exception (the paper's code turned it into NaN).
PESQ's C code holds the GIL, so parallelism needs processes: pass `pool=` (see common.make_pool).
"""

from __future__ import annotations

import numpy as np

from fewsound.metrics.common import NotApplicable, as_batch, check_pair, map_pairs, resample_paper

PESQ_SR = 16_000
MODES = ("wb", "nb")


def pesq_pair(ref16: np.ndarray, rec16: np.ndarray, mode: str = "wb") -> float | NotApplicable:
    """PESQ of one pair already at 16 kHz (`[M]` float32). Runs in pool workers, so it is a top-level function."""
    import pesq as pesq_pkg

    try:
        return float(pesq_pkg.pesq(PESQ_SR, ref16, rec16, mode))
    except pesq_pkg.NoUtterancesError:
        return NotApplicable("PESQ detected no utterance in the reference (not speech, or silent)")
    except pesq_pkg.BufferTooShortError:
        return NotApplicable("clip shorter than the 1/4 s PESQ needs")


def pesq_inputs(refs, recs, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact 16 kHz float32 signals PESQ scores: `[B, M]` each (kaiser_best resample of `[B, N]`)."""
    x, y = as_batch(refs, "refs"), as_batch(recs, "recs")
    check_pair(x, y)
    return resample_paper(x, sr, PESQ_SR), resample_paper(y, sr, PESQ_SR)


def pesq_scores(refs, recs, sr: int, mode: str = "wb", pool=None, workers: int = 1):
    """PESQ per clip: an iterator of B floats / NotApplicable (lazy; consume it with list())."""
    assert mode in MODES, f"PESQ mode must be one of {MODES}, got {mode!r}"
    x16, y16 = pesq_inputs(refs, recs, sr)
    return map_pairs(pesq_pair, list(x16), list(y16), [mode] * len(x16), pool=pool, workers=workers)
