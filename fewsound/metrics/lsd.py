"""Log-spectral distance exactly as the paper's public code computes it (its formula differs from the text's).

    n_fft = int(2048 / (44100 / sr))  (1024 at 22,050 Hz),  hop = int(sr / 100)  (220),  Hann window,
    torch.stft(center=True, pad_mode="constant"),  S = |STFT(x)|,  S' = |STFT(x')|
    LSD = mean_frames sqrt( mean_freq ( log10( S^2 / (S' + 1e-12)^2 + 1e-12 ) )^2 )

Computed in float32 like the paper (its tensors were float32). Other LSD variants (natural log, magnitude instead
of power, averaging over both axes before the sqrt) give different numbers; this one matches the paper's tables.
Note one quirk of the formula: a frame that is exactly zero in *both* signals (digital silence) contributes
log10(1e-12)^2 = 144 per bin, so identical signals only give LSD 0 when no STFT frame is all-zero.
"""

from __future__ import annotations

import numpy as np
import torch

from fewsound.metrics.common import as_batch, check_pair


def lsd_params(sr: int) -> tuple[int, int]:
    """(n_fft, hop) of the paper's LSD at sample rate `sr`."""
    return int(2048 / (44100 / sr)), int(sr / 100)


def lsd(refs, recs, sr: int) -> np.ndarray:
    """refs, recs: `[B, N]` -> LSD per clip `[B]` (float64 numpy of the float32 result)."""
    x, y = as_batch(refs, "refs"), as_batch(recs, "recs")
    check_pair(x, y)
    n_fft, hop = lsd_params(sr)
    window = torch.hann_window(n_fft)

    def mag(a: np.ndarray) -> torch.Tensor:  # [B, N] -> [B, F, T]
        t = torch.from_numpy(a.astype(np.float32))
        return torch.stft(t, n_fft, hop, window=window, center=True, pad_mode="constant", return_complex=True).abs()

    s, s_rec = mag(x), mag(y)
    d = torch.log10(s**2 / (s_rec + 1e-12) ** 2 + 1e-12) ** 2
    return d.mean(dim=1).sqrt().mean(dim=-1).double().numpy()
