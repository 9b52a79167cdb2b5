"""The paper's loss, batched, against a direct unbatched float64 computation with librosa."""

from __future__ import annotations

import warnings

import librosa
import numpy as np
import pytest
import torch

from fewsound.losses import (
    RESOLUTIONS,
    ReconstructionLoss,
    fit_loss,
    l1_loss,
    mel_bands_for,
    mel_filterbank,
    mel_stft_loss,
)

SR = 22_050


def reference_loss(pred: np.ndarray, target: np.ndarray, lambda_t: float = 1.0, lambda_f: float = 1.0) -> float:
    """One clip, float64, written straight from the paper's code description (librosa STFT + filterbank)."""
    pred, target = pred.astype(np.float64), target.astype(np.float64)
    l1 = np.mean(np.abs(pred - target))
    per_res = []
    for n_fft, hop, win in RESOLUTIONS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # librosa warns about nothing here, but be safe on old versions
            fb = librosa.filters.mel(sr=SR, n_fft=n_fft, n_mels=mel_bands_for(n_fft), dtype=np.float64)

        def mel(x, n_fft=n_fft, hop=hop, win=win, fb=fb):
            spec = librosa.stft(
                x, n_fft=n_fft, hop_length=hop, win_length=win, window="hann", center=True, pad_mode="reflect"
            )
            return fb @ np.sqrt(np.maximum(spec.real**2 + spec.imag**2, 1e-8))

        d = mel(pred) - mel(target)
        per_res.append(np.mean(np.abs(d)) + np.sqrt(np.mean(d**2)))
    return lambda_t * l1 + lambda_f * float(np.mean(per_res))


@pytest.fixture(scope="module")
def speech_pair(speech_clips):
    """A real speech target and a plausible imperfect reconstruction of it."""
    rng = np.random.default_rng(0)
    targets = [c.load(sr=SR)[:6000] for c in speech_clips[:3]]
    targets = [t / np.abs(t).max() for t in targets]
    preds = [0.8 * t + 0.02 * rng.standard_normal(t.shape) for t in targets]
    return np.stack(preds).astype(np.float32), np.stack(targets).astype(np.float32)


def test_filterbank_equals_librosa():
    for n_fft in (2048, 512, 128):
        for n_mels in (128, 40):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 128 bands at n_fft=128 has empty filters: that is the point
                ref = librosa.filters.mel(sr=SR, n_fft=n_fft, n_mels=n_mels)
            np.testing.assert_allclose(mel_filterbank(SR, n_fft, n_mels), ref, atol=1e-7, rtol=1e-5)


def test_band_counts_are_the_largest_without_empty_filters():
    assert [mel_bands_for(n) for n, _, _ in RESOLUTIONS] == [128, 128, 128, 76, 37]
    for n_fft, _, _ in RESOLUTIONS:
        m = mel_bands_for(n_fft)
        assert (mel_filterbank(SR, n_fft, m).max(axis=1) > 0).all()
        if m < 128:
            assert (mel_filterbank(SR, n_fft, m + 1).max(axis=1) == 0).any()


@pytest.mark.parametrize("lambdas", [(1.0, 1.0), (0.3, 2.0), (1.0, 0.0)])
def test_batched_loss_matches_unbatched_reference(speech_pair, lambdas):
    preds, targets = speech_pair
    got = fit_loss(torch.from_numpy(preds), torch.from_numpy(targets), lambda_t=lambdas[0], lambda_f=lambdas[1])
    assert got.shape == (len(preds),)
    want = [reference_loss(p, t, *lambdas) for p, t in zip(preds, targets)]
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5)
    # the three clips really differ, so a batch mix-up would be caught
    assert len({round(w, 6) for w in want}) == len(want)


def test_precomputed_target_equals_functional(speech_pair):
    preds, targets = map(torch.from_numpy, speech_pair)
    a = ReconstructionLoss(targets)(preds)
    b = fit_loss(preds, targets)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_per_clip_losses_are_independent(speech_pair):
    preds, targets = map(torch.from_numpy, speech_pair)
    preds = preds.clone().requires_grad_()
    loss = fit_loss(preds, targets)
    (grad,) = torch.autograd.grad(loss[1], preds)
    assert grad[1].abs().sum() > 0
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0
    # the loss of one clip does not change when another clip in the batch changes
    other = preds.detach().clone()
    other[0] = 0.0
    torch.testing.assert_close(fit_loss(other, targets)[1:], loss.detach()[1:])


def test_loss_is_zero_and_gradient_finite_at_exact_fit(speech_pair):
    _, targets = map(torch.from_numpy, speech_pair)
    pred = targets.clone().requires_grad_()
    loss = fit_loss(pred, targets)
    assert float(loss.detach().max()) < 1e-5
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_l1_and_mel_terms_separately(speech_pair):
    preds, targets = map(torch.from_numpy, speech_pair)
    torch.testing.assert_close(fit_loss(preds, targets, lambda_f=0.0), l1_loss(preds, targets))
    torch.testing.assert_close(
        fit_loss(preds, targets, lambda_t=0.0, lambda_f=2.0), 2.0 * mel_stft_loss(preds, targets)
    )
