"""The paper's reconstruction loss: `lambda_t * L1 + lambda_f * multi-resolution mel-STFT`.

Both terms follow the paper's public code:
- L1: mean |x - x'| over samples.
- Mel-STFT: at each resolution (n_fft / hop / win) 2048/512/2048, 1024/256/1024, 512/128/512, 256/64/256 and
  128/32/128, a centred Hann STFT (reflect padding), magnitude `sqrt(clamp(re^2 + im^2, 1e-8))`, a Slaney mel
  filterbank at 22,050 Hz applied to the *linear* magnitude, then `mean|M - M'| + sqrt(mean (M - M')^2)`;
  the resolutions are averaged.

Everything is batched over clips and returns one loss per clip (`[B]`): a packed fit back-propagates the sum,
which keeps the clips' gradients independent because no operation here mixes clips.

Mel bands. The paper's code asks for 128 bands at every resolution, but at 22,050 Hz a 256- or 128-point FFT
has too few bins for 128 Slaney filters: some triangles fall between two bins and are all zero (librosa warns
"Empty filters"; the FewSound code asserts, HyperSound commented the assert out). An empty band contributes a
constant 0 to both M and M', which only dilutes the mean. We use, per resolution, the largest band count
<= 128 whose filters are all non-empty (`mel_bands_for`): 128 for n_fft 2048/1024/512, 76 for 256, 37 for 128.
The filterbank is our own implementation of the Slaney formula (librosa.filters.mel defaults: Slaney mel
scale, Slaney area normalisation, fmin 0, fmax sr/2); tests check it against librosa. It is computed once per
(n_fft, bands, sr, device, dtype) and cached.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

# (n_fft, hop, win) of the paper's code, coarsest first.
RESOLUTIONS: tuple[tuple[int, int, int], ...] = (
    (2048, 512, 2048),
    (1024, 256, 1024),
    (512, 128, 512),
    (256, 64, 256),
    (128, 32, 128),
)
MAX_MEL_BANDS = 128
MAG_FLOOR = 1e-8  # clamp on re^2 + im^2 before the sqrt (paper's code)
# sqrt(mean sq) has an infinite derivative at 0; below this floor (i.e. a per-clip RMS error < 1e-6) the RMSE term
# is held constant so an exact fit yields a zero gradient instead of NaN. Far below any reachable fit error.
_MSE_FLOOR = 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Slaney mel filterbank (numpy, float64), equal to librosa.filters.mel(sr, n_fft, n_mels) with its defaults.


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """Slaney's Auditory Toolbox mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    log_part = min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log_part, f / f_sp)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    """Inverse of `hz_to_mel`."""
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3.0, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    log_part = min_log_hz * np.exp(logstep * (np.maximum(m, min_log_mel) - min_log_mel))
    return np.where(m >= min_log_mel, log_part, f_sp * m)


def mel_filterbank(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters: float32 [n_mels, n_fft // 2 + 1] (fmin 0, fmax sr / 2)."""
    fft_hz = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2.0), n_mels + 2))  # [n_mels + 2]
    widths = np.diff(edges_hz)  # [n_mels + 1]
    dist = edges_hz[:, None] - fft_hz[None, :]  # [n_mels + 2, F]
    rising = -dist[:-2] / widths[:-1, None]
    falling = dist[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    # Slaney normalisation: each triangle has unit area in Hz, so wide high bands are not over-weighted.
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights.astype(np.float32)


@functools.lru_cache(maxsize=None)
def mel_bands_for(n_fft: int, sr: int = 22_050, max_bands: int = MAX_MEL_BANDS) -> int:
    """The largest band count <= max_bands whose Slaney filters at (sr, n_fft) are all non-empty."""
    for n_mels in range(max_bands, 0, -1):
        if (mel_filterbank(sr, n_fft, n_mels).max(axis=1) > 0).all():
            return n_mels
    raise ValueError(f"no non-empty mel filterbank for n_fft={n_fft} at {sr} Hz")


@functools.lru_cache(maxsize=None)
def _cached_filterbank(sr: int, n_fft: int, n_mels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(mel_filterbank(sr, n_fft, n_mels)).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _cached_window(win: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.hann_window(win, periodic=True, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# The loss terms. Shapes: pred, target: [B, N] -> [B].


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-clip mean |pred - target|: [B, N] -> [B]."""
    return (pred - target).abs().mean(dim=-1)


def mel_magnitude(x: torch.Tensor, n_fft: int, hop: int, win: int, sr: int = 22_050) -> torch.Tensor:
    """Mel-filtered linear STFT magnitude: x [B, N] -> [B, n_mels, frames]."""
    assert x.dim() == 2, f"expected [B, N], got {tuple(x.shape)}"
    assert x.shape[-1] > n_fft // 2, f"{x.shape[-1]} samples is too short for a centred {n_fft}-point STFT"
    spec = torch.stft(
        x,
        n_fft=n_fft,
        hop_length=hop,
        win_length=win,
        window=_cached_window(win, x.device, x.dtype),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )  # [B, F, frames]
    mag = torch.sqrt(torch.clamp(spec.real.square() + spec.imag.square(), min=MAG_FLOOR))
    fb = _cached_filterbank(sr, n_fft, mel_bands_for(n_fft, sr), x.device, x.dtype)  # [n_mels, F]
    return torch.matmul(fb, mag)  # [n_mels, F] @ [B, F, T] -> [B, n_mels, T]


def mel_stft_loss(
    pred: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    sr: int = 22_050,
    resolutions: tuple[tuple[int, int, int], ...] = RESOLUTIONS,
    target_mels: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Multi-resolution mel-STFT loss per clip: [B, N] -> [B] (mean over resolutions of L1 + RMSE of mels).

    Pass either `target` [B, N] or `target_mels` (from `target_mel_features`, to compute a fixed target once).
    """
    assert pred.dim() == 2, tuple(pred.shape)
    if target_mels is None:
        assert target is not None and target.shape == pred.shape, (tuple(pred.shape), target)
        target_mels = target_mel_features(target, sr=sr, resolutions=resolutions)
    assert len(target_mels) == len(resolutions)
    total = pred.new_zeros(pred.shape[0])
    for (n_fft, hop, win), target_mel in zip(resolutions, target_mels):
        diff = mel_magnitude(pred, n_fft, hop, win, sr) - target_mel
        l1 = diff.abs().mean(dim=(1, 2))
        rmse = torch.sqrt(diff.square().mean(dim=(1, 2)).clamp_min(_MSE_FLOOR))
        total = total + l1 + rmse
    return total / len(resolutions)


def target_mel_features(
    target: torch.Tensor, *, sr: int = 22_050, resolutions: tuple[tuple[int, int, int], ...] = RESOLUTIONS
) -> list[torch.Tensor]:
    """Mel magnitudes of a fixed target at every resolution (no grad): [B, N] -> list of [B, n_mels, frames]."""
    with torch.no_grad():
        return [mel_magnitude(target, n_fft, hop, win, sr) for n_fft, hop, win in resolutions]


def fit_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    lambda_t: float = 1.0,
    lambda_f: float = 1.0,
    sr: int = 22_050,
) -> torch.Tensor:
    """The paper's loss per clip: `lambda_t * L1 + lambda_f * mel-STFT`, pred/target [B, N] -> [B].

    A term whose lambda is 0 is not computed at all (the paper's single-INR configs use L1 only).
    """
    return ReconstructionLoss(target, lambda_t=lambda_t, lambda_f=lambda_f, sr=sr)(pred)


class ReconstructionLoss:
    """The paper's loss against a fixed target [B, N], whose mel features are computed once.

    `loss(pred)` -> [B]; equal to `fit_loss(pred, target, ...)`. A fit evaluates the target's STFTs once
    instead of every step, which halves the spectral work of the loss.
    """

    def __init__(self, target: torch.Tensor, *, lambda_t: float = 1.0, lambda_f: float = 1.0, sr: int = 22_050):
        assert target.dim() == 2, f"expected target [B, N], got {tuple(target.shape)}"
        assert lambda_t >= 0 and lambda_f >= 0, (lambda_t, lambda_f)
        self.target = target.detach()
        self.lambda_t, self.lambda_f, self.sr = float(lambda_t), float(lambda_f), int(sr)
        self.target_mels = target_mel_features(self.target, sr=self.sr) if self.lambda_f else None

    def __call__(self, pred: torch.Tensor) -> torch.Tensor:
        assert pred.shape == self.target.shape, (tuple(pred.shape), tuple(self.target.shape))
        loss = pred.new_zeros(pred.shape[0])
        if self.lambda_t:
            loss = loss + self.lambda_t * l1_loss(pred, self.target)
        if self.lambda_f:
            loss = loss + self.lambda_f * mel_stft_loss(pred, sr=self.sr, target_mels=self.target_mels)
        return loss
