"""Waveform metrics: MSE, PSNR, SNR and SI-SNR, one value per clip.

refs, recs: `[B, N]` (or `[N]`) arrays/tensors; every function returns float64 numpy `[B]`. Computed in float64.

Perfect reconstructions are reported as exactly `+inf` dB (PSNR, SNR, SI-SNR), not as a large eps-clamped
number: the paper's code (torchmetrics) adds float32 eps to both energies, which turns "identical" into
~90-150 dB depending on the clip's energy - an arbitrary constant that would bias means without saying so.
For any real error the difference to the eps'd formula is far below 1e-4 dB.
"""

from __future__ import annotations

import numpy as np

from fewsound.metrics.common import as_batch, check_pair


def _db(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """10 log10(num / den) with den == 0 -> +inf (num > 0) explicitly, without numpy's divide warnings."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return 10.0 * np.log10(num / den)


def mse(refs, recs) -> np.ndarray:
    """mean((x - x')^2) over time, per clip. `[B]`"""
    x, y = as_batch(refs, "refs"), as_batch(recs, "recs")
    check_pair(x, y)
    return np.mean((x - y) ** 2, axis=-1)


def psnr(refs, recs) -> np.ndarray:
    """PSNR in dB as the paper's code (torchmetrics PeakSignalNoiseRatio without data_range), per clip:

        PSNR = 10 log10( (max(x) - min(x))^2 / mean((x - x')^2) )

    The data range is taken from the reference x only (max - min of the clip), not fixed to 1 or 2.
    Identical signals -> +inf. `[B]`
    """
    x, y = as_batch(refs, "refs"), as_batch(recs, "recs")
    check_pair(x, y)
    data_range = x.max(axis=-1) - x.min(axis=-1)
    return _db(data_range**2, np.mean((x - y) ** 2, axis=-1))


def snr(refs, recs) -> np.ndarray:
    """SNR = 10 log10( sum x^2 / sum (x - x')^2 ) in dB (no mean removal, no rescaling). `[B]`"""
    x, y = as_batch(refs, "refs"), as_batch(recs, "recs")
    check_pair(x, y)
    return _db(np.sum(x**2, axis=-1), np.sum((x - y) ** 2, axis=-1))


def si_snr(refs, recs) -> np.ndarray:
    """Scale-invariant SNR in dB (zero-mean SI-SDR, as torchmetrics ScaleInvariantSignalNoiseRatio):

        x, x' <- x - mean(x), x' - mean(x');  s = (<x', x> / <x, x>) x;  SI-SNR = 10 log10( |s|^2 / |x' - s|^2 )

    Invariant to any non-zero scaling of x'. Identical (or exactly proportional) signals -> +inf or a huge value
    limited by float64 rounding. `[B]`
    """
    x, y = as_batch(refs, "refs"), as_batch(recs, "recs")
    check_pair(x, y)
    x = x - x.mean(axis=-1, keepdims=True)
    y = y - y.mean(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.sum(x * y, axis=-1, keepdims=True) / np.sum(x * x, axis=-1, keepdims=True)
    target = alpha * x
    return _db(np.sum(target**2, axis=-1), np.sum((y - target) ** 2, axis=-1))
