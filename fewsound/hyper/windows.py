"""Arbitrary-length audio through a fixed-window model: overlapping windows, raised-cosine crossfades.

A file of any length is cut into windows of `window` samples (the model's clip_length) starting every
`window - overlap` samples; the last window is aligned to the file's end (a file shorter than one window is
zero-padded). Every pair of neighbouring windows is crossfaded over `overlap` samples centred in their common
region with complementary raised-cosine weights (sin^2 rising, 1 - sin^2 falling), so the weights of the
windows covering any sample sum to one: a model that returns its input gives back the file exactly, and a
model whose windows disagree (e.g. a different offset per window) changes smoothly across each seam instead of
jumping. Each window may be peak-normalised before the model (as in training) and scaled back after.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

Tensor = torch.Tensor


def window_starts(n: int, window: int, overlap: int) -> list[int]:
    """Start of each window: 0, hop, 2 hop, ... and a last one ending exactly at n (n > window)."""
    assert 0 <= overlap < window, (overlap, window)
    if n <= window:
        return [0]
    hop = window - overlap
    starts = list(range(0, n - window, hop))
    return starts + [n - window]


def crossfade_weights(starts: list[int], window: int, overlap: int, dtype=torch.float32) -> Tensor:
    """[W, window] weights; at every covered sample the weights of the windows covering it sum to 1."""
    w = torch.ones(len(starts), window, dtype=torch.float64)
    for i in range(1, len(starts)):
        common = starts[i - 1] + window - starts[i]  # samples shared with the previous window
        r = min(overlap, common)
        if r <= 0:
            continue
        a = starts[i] + (common - r) // 2  # crossfade [a, a + r) in file coordinates
        ramp = torch.sin(0.5 * math.pi * (torch.arange(r, dtype=torch.float64) + 0.5) / r) ** 2
        lo = a - starts[i]  # in window i
        w[i, :lo] = 0.0
        w[i, lo : lo + r] *= ramp
        lo_prev = a - starts[i - 1]  # in window i - 1
        w[i - 1, lo_prev : lo_prev + r] *= 1.0 - ramp
        w[i - 1, lo_prev + r :] = 0.0
    return w.to(dtype)


@torch.no_grad()
def reconstruct_long(
    model: Callable[[Tensor], Tensor],
    audio: Tensor | np.ndarray,
    *,
    window: int | None = None,
    overlap: int | None = None,
    batch_size: int = 8,
    normalize: bool = True,
) -> Tensor:
    """audio [n] (any n >= 1) -> reconstruction [n] (float32, CPU).

    model: maps windows [b, window] -> [b, window] (a FewSound/HyperSound model, or any such function).
    window: default model.config.clip_length. overlap: default window // 4 (8,192 of 32,768 samples).
    batch_size: windows per model call. normalize: divide each window by its peak before the model and
    multiply back after (training clips are peak-normalised); silent windows are left as they are.
    """
    cfg: Any = getattr(model, "config", None)  # a HyperConfig for a model; a plain function has none
    window = int(window or cfg.clip_length)
    overlap = window // 4 if overlap is None else int(overlap)
    assert 0 <= overlap < window, f"overlap must be in [0, {window}), got {overlap}"
    x = torch.as_tensor(np.asarray(audio, dtype=np.float32) if not torch.is_tensor(audio) else audio).float().cpu()
    assert x.dim() == 1 and x.numel() >= 1, f"audio must be [n] with n >= 1, got {tuple(x.shape)}"
    n = x.numel()
    padded = torch.nn.functional.pad(x, (0, max(0, window - n)))
    starts = window_starts(padded.numel(), window, overlap)
    frames = torch.stack([padded[s : s + window] for s in starts])  # [W, window]
    peak = frames.abs().amax(dim=1, keepdim=True)
    scale = torch.where(peak > 1e-4, peak, torch.ones_like(peak)) if normalize else torch.ones_like(peak)
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    outs = []
    for i in range(0, len(starts), batch_size):
        chunk = (frames[i : i + batch_size] / scale[i : i + batch_size]).to(device)
        y = model(chunk)
        assert y.shape == chunk.shape, (y.shape, chunk.shape)
        outs.append(y.float().cpu())
    y = torch.cat(outs) * scale
    weights = crossfade_weights(starts, window, overlap)
    out = torch.zeros(padded.numel(), dtype=torch.float64)
    total = torch.zeros(padded.numel(), dtype=torch.float64)
    for s, yi, wi in zip(starts, y.double(), weights.double()):
        out[s : s + window] += wi * yi
        total[s : s + window] += wi
    # The weights already sum to one; dividing removes float rounding so identity in -> identity out exactly.
    return (out / total.clamp_min(1e-12))[:n].float()
