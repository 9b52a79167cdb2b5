"""The paper's high-frequency-biased Wasserstein distance between spectra (Section 4.4, Table 11).

|FFT| of each clip (the full N-bin FFT: the paper's support has len(audio) points) is normalised into a
probability distribution over the bins k = 0..N-1, placed at the support points k^2 (instead of k) so that mass
moved between high bins costs more. The 1-D Wasserstein-1 distance between the two distributions is divided by the
constant 32,768 as in Table 11 ("scaled down by ... 32768, that is the length of the sample"); we keep the constant
32,768 for every clip length, so values for 3 s clips are on the same scale rule as the table.

On a common sorted support s_0 < ... < s_{N-1}, W1(P, Q) = sum_i |CDF_P(s_i) - CDF_Q(s_i)| (s_{i+1} - s_i)
(the area between the CDFs), which for s_k = k^2 has s_{k+1} - s_k = 2k + 1.
"""

from __future__ import annotations

import numpy as np

from fewsound.metrics.common import as_batch, check_pair

TABLE11_SCALE = 32_768.0


def spectrum_distribution(x: np.ndarray) -> np.ndarray:
    """`[B, N]` -> |FFT| normalised to sum 1 over the N bins, `[B, N]` float64 (NaN rows for an all-zero clip)."""
    mag = np.abs(np.fft.fft(x, axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return mag / mag.sum(axis=-1, keepdims=True)


def wasserstein_hf(refs, recs, scale: float = TABLE11_SCALE) -> np.ndarray:
    """High-frequency-biased W1 between the spectra of refs and recs, divided by `scale`. `[B]`

    A clip whose spectrum is all zero has no frequency distribution: its entry is NaN (evaluate() reports it as
    not applicable with that reason).
    """
    x, y = as_batch(refs, "refs"), as_batch(recs, "recs")
    check_pair(x, y)
    n = x.shape[-1]
    cdf_gap = np.cumsum(spectrum_distribution(x) - spectrum_distribution(y), axis=-1)[:, :-1]
    step = 2.0 * np.arange(n - 1, dtype=np.float64) + 1.0  # (k+1)^2 - k^2
    return np.sum(np.abs(cdf_gap) * step, axis=-1) / scale
