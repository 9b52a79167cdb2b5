"""bf16 only where it holds: every family's forward under bfloat16 autocast stays close to its float32 forward.

SIREN and FINER (sines of phases up to thousands of radians) and WIRE (Gabor wavelets) opt out of autocast and
run in float32 inside it (fewsound.inr.base); NeRF, RFF and KAN run their matmuls in bfloat16."""

from __future__ import annotations

import pytest
import torch

from fewsound.fit import FitConfig, fit
from fewsound.inr import FAMILIES, build_inr, coordinates

N = 8192
TOLERANCE = 0.02  # relative L2 error of the forward


def relative_error(family: str) -> float:
    inr = build_inr(family)
    params, buffers = inr.init([0, 1])
    t = coordinates(N)
    with torch.no_grad():
        ref = inr(params, t, buffers)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = inr(params, t, buffers)
    return float((low.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_under_bf16_autocast_is_close_to_float32(family):
    err = relative_error(family)
    assert err < TOLERANCE, f"{family}: relative error {err:.3f} under bf16 autocast"
    if FAMILIES[family].autocast_safe:  # autocast really ran in bfloat16 for these: not bit-equal to float32
        assert err > 0


def test_a_bf16_siren_fit_learns_like_a_full_precision_one(speech_clips):
    import numpy as np

    x = speech_clips[0].load(sr=22_050)[:4096]
    x = (x / np.abs(x).max()).astype(np.float32)
    full, bf16 = (fit(FitConfig(family="siren", steps=20, precision=p), x)[0] for p in ("full", "bf16"))
    assert bf16.loss == pytest.approx(full.loss, rel=1e-6)  # SIREN's forward is float32 either way
