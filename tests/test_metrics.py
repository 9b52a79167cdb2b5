"""The metrics against closed forms, against the reference packages called directly, and on real speech with
known degradations (built-in corpus). CDPAM runs on CPU here, so it gets few, short pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fewsound.errors import AudioError, ConfigError
from fewsound.metrics import METRICS, evaluate, to_mlflow
from fewsound.metrics.lsd import lsd, lsd_params
from fewsound.metrics.signal import mse, psnr, si_snr, snr
from fewsound.metrics.wasserstein import wasserstein_hf

SR = 22_050
N = 32_768  # the paper's 1.5 s clips


@pytest.fixture(scope="module")
def speech(speech_clips):
    """Four real 1.5 s speech clips at 22,050 Hz, float64 [4, N], peak-normalised like the paper's data."""
    xs = [c.load(sr=SR)[:N].astype(np.float64) for c in speech_clips[:4]]
    assert all(len(x) == N for x in xs)
    return np.stack([x / np.abs(x).max() for x in xs])


def add_noise(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """x + white noise scaled so that 10 log10(|x|^2 / |n|^2) == snr_db exactly."""
    n = np.random.default_rng(seed).standard_normal(x.shape)
    n *= np.sqrt(np.sum(x**2, axis=-1, keepdims=True) / np.sum(n**2, axis=-1, keepdims=True) / 10 ** (snr_db / 10))
    return x + n


def low_pass(x: np.ndarray, cutoff_hz: float) -> np.ndarray:
    """Brick-wall low-pass in the FFT domain."""
    spec = np.fft.rfft(x, axis=-1)
    spec[..., np.fft.rfftfreq(x.shape[-1], 1 / SR) > cutoff_hz] = 0
    return np.fft.irfft(spec, n=x.shape[-1], axis=-1)


def clip_at(x: np.ndarray, level: float) -> np.ndarray:
    return np.clip(x, -level, level)


# ---------------------------------------------------------------------------------------------- closed forms


def test_identical_signals(speech):
    # A tiny dither keeps every STFT bin non-zero (see test_lsd_zero_bin_quirk for exactly-zero bins).
    x = speech[:2] + 1e-5 * np.random.default_rng(1).standard_normal(speech[:2].shape)
    assert np.all(mse(x, x) == 0)
    assert np.all(np.isposinf(psnr(x, x))) and np.all(np.isposinf(snr(x, x))) and np.all(np.isposinf(si_snr(x, x)))
    assert np.all(lsd(x, x, SR) < 1e-6)  # 0 up to float32 rounding of the +1e-12 in the formula
    assert np.all(wasserstein_hf(x, x) == 0)
    row = evaluate(x[:1], x[:1], SR, metrics=["mse", "psnr", "si_snr", "lsd", "wd_hf"])[0]
    assert row["psnr"] == math.inf and row["si_snr"] == math.inf and row["mse"] == 0 and row["lsd"] < 1e-6


def test_lsd_zero_bin_quirk():
    """The paper's formula gives log10(0 / 1e-24 + 1e-12)^2 = 144 for a bin that is 0 in both signals: an all-zero
    clip of T frames has LSD sqrt(144) = 12 in every frame."""
    z = np.zeros((1, 4096))
    assert lsd(z, z, SR)[0] == pytest.approx(12.0, rel=1e-6)


def test_scaled_copy(speech):
    x, y = speech, add_noise(speech, 15.0)
    assert np.allclose(si_snr(x, 0.37 * y), si_snr(x, y), atol=1e-9)
    assert np.allclose(si_snr(x, -3.0 * y), si_snr(x, y), atol=1e-9)
    assert np.all(si_snr(x, 0.5 * x) > 200)  # exact up to float64 rounding
    assert np.all(snr(x, 0.5 * x) == pytest.approx(10 * np.log10(4.0)))  # SNR is not scale-invariant
    # LSD closed form: halving the amplitude scales |S'| by 1/2 in every bin -> log10(4) everywhere.
    xd = x + 1e-5 * np.random.default_rng(2).standard_normal(x.shape)
    assert np.allclose(lsd(xd, 0.5 * xd, SR), np.log10(4.0), atol=1e-5)
    assert np.allclose(wasserstein_hf(xd, 0.5 * xd), 0, atol=1e-9)  # spectra are normalised


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0, 30.0])
def test_known_snr(speech, snr_db):
    y = add_noise(speech, snr_db, seed=int(snr_db))
    assert np.allclose(snr(speech, y), snr_db, atol=1e-9)
    assert np.all(np.abs(si_snr(speech, y) - snr_db) < 0.1)


def test_psnr_and_mse_closed_form():
    t = np.linspace(0, 1, 8000)
    x = 0.5 * np.sin(2 * np.pi * 5 * t) - 0.2
    x[10], x[20] = 0.6, -1.0  # data range of the reference: exactly 1.6
    y = x + 0.01
    assert mse(x, y)[0] == pytest.approx(1e-4, rel=1e-9)
    assert psnr(x, y)[0] == pytest.approx(10 * np.log10(1.6**2 / 1e-4), rel=1e-9)
    assert psnr(x, x + 0.02)[0] == pytest.approx(psnr(x, y)[0] - 20 * np.log10(2), rel=1e-9)
    # The data range is inferred from the data, so scaling both signals leaves PSNR unchanged
    # (a fixed data_range of 1 or 2 would shift it by 20 log10(3) here).
    assert psnr(3 * x, 3 * y)[0] == pytest.approx(psnr(x, y)[0], rel=1e-9)


def test_lsd_matches_an_independent_numpy_stft(speech):
    assert lsd_params(22_050) == (1024, 220) and lsd_params(16_000) == (743, 160)
    # A noise floor in both signals keeps every bin far above float32 rounding, so float32 (torch, as the paper)
    # and float64 (here) agree to 1e-5; a wrong n_fft/hop/window/padding would not.
    x = speech[:2] + 1e-3 * np.random.default_rng(4).standard_normal(speech[:2].shape)
    y = add_noise(x, 20.0)
    n_fft, hop = lsd_params(SR)
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann

    def mag(a):
        a = np.pad(a, ((0, 0), (n_fft // 2, n_fft // 2)))  # centred, zero padding
        frames = np.stack([a[:, i : i + n_fft] for i in range(0, a.shape[-1] - n_fft + 1, hop)], axis=1)
        return np.abs(np.fft.rfft(frames * win, axis=-1))  # [B, T, F]

    s, s2 = mag(x), mag(y)
    want = np.sqrt(np.mean(np.log10(s**2 / (s2 + 1e-12) ** 2 + 1e-12) ** 2, axis=-1)).mean(axis=-1)
    assert np.allclose(lsd(x, y, SR), want, rtol=1e-5)


def test_wasserstein_closed_form_and_scipy(speech):
    n = 4096
    k = np.arange(n)
    k1, k2 = 100, 700
    a, b = np.cos(2 * np.pi * k1 * k / n), np.cos(2 * np.pi * k2 * k / n)
    # |FFT| has half the mass at k and half at n - k; each half moves from k1 to k2 (support k^2).
    want = 0.5 * (k2**2 - k1**2) + 0.5 * ((n - k1) ** 2 - (n - k2) ** 2)
    assert wasserstein_hf(a, b, scale=1.0)[0] == pytest.approx(want, rel=1e-6)
    assert wasserstein_hf(a, b)[0] == pytest.approx(want / 32768, rel=1e-6)
    import scipy.stats as stats  # pinned in pyproject.toml: a missing scipy is a failure, not a skip

    x, y = speech[:2], add_noise(speech[:2], 20.0)
    support = np.arange(N, dtype=np.float64) ** 2
    ours = wasserstein_hf(x, y)
    for i in range(2):
        ref = stats.wasserstein_distance(support, support, np.abs(np.fft.fft(x[i])), np.abs(np.fft.fft(y[i])))
        assert ours[i] == pytest.approx(ref / 32768, rel=1e-6)


# ------------------------------------------------------------------------------ against the packages directly


def test_pesq_and_stoi_equal_direct_package_calls(speech):
    import librosa
    from pesq import pesq
    from pystoi import stoi

    x, y = speech[:2].astype(np.float32), add_noise(speech[:2], 15.0).astype(np.float32)
    rows = evaluate(x, y, SR, metrics=["pesq", "pesq_nb", "stoi", "estoi"])
    x16 = librosa.resample(x, orig_sr=SR, target_sr=16000, res_type="kaiser_best")
    y16 = librosa.resample(y, orig_sr=SR, target_sr=16000, res_type="kaiser_best")
    for i, row in enumerate(rows):
        assert row["pesq"] == pesq(16000, x16[i], y16[i], "wb")
        assert row["pesq_nb"] == pesq(16000, x16[i], y16[i], "nb")
        # STOI to the last bits: its float sums may round differently between calls (seen once in 300+ runs)
        assert row["stoi"] == pytest.approx(stoi(x[i], y[i], SR, extended=False), rel=1e-12, abs=0)
        assert row["estoi"] == pytest.approx(stoi(x[i], y[i], SR, extended=True), rel=1e-12, abs=0)
    # A pool of worker processes gives the same numbers.
    assert evaluate(x, y, SR, metrics=["pesq", "stoi"], workers=2) == [
        {k: r[k] for k in ("pesq", "stoi", "not_applicable")} for r in rows
    ]


def test_cdpam_equals_the_package(speech, monkeypatch):
    """Against cdpam.CDPAM(dev='cpu') constructed by the package's own __init__ (its torch.load needs
    weights_only=False on torch >= 2.6; torch's own switch for that, scoped to this test) and its own forward."""
    import cdpam
    import torch

    from fewsound.metrics.cdpam import cdpam_distance, load_cdpam

    x, y = speech[:2, :5513], add_noise(speech[:2, :5513], 10.0)  # 1/4 s: the package's network is slow on CPU
    ours = cdpam_distance(x, y, SR, device="cpu")
    assert load_cdpam("cpu") is load_cdpam("cpu")  # loaded once per process and device
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.warns(UserWarning, match="weights_only"):
        pkg = cdpam.CDPAM(dev="cpu")

    def to_int16(a):
        return torch.from_numpy(np.round(a.astype(np.float32).astype(np.float64) * 32768).astype(np.float32))

    with torch.no_grad():
        for i in range(2):
            direct = pkg.forward(to_int16(x[i : i + 1]), to_int16(y[i : i + 1])).item()
            assert ours[i] == pytest.approx(direct, rel=1e-5, abs=1e-7)
    assert np.all(ours > 0.05)


@pytest.fixture(scope="module")
def fft_and_direct():
    """CDPAM with FFT convolutions (the process's model, as evaluate() uses it: its weight spectra are made once)
    and with direct ones."""
    from fewsound.metrics.cdpam import CDPAMModel, load_cdpam

    fft = load_cdpam("cpu")
    assert fft.conv == "fft"
    return fft, CDPAMModel("cpu", conv="direct")


# Odd and even lengths through the four stride-2 (polyphase) layers: 2065 = 16 * 129 + 1 stays odd at each of them
# (a stride-2 layer keeps ceil(n / 2)), 2080 = 16 * 130 stays even; both leave a ragged last overlap-save block.
@pytest.mark.parametrize("n", [2065, 2080])
def test_cdpam_fft_convolutions_equal_the_direct_ones(speech, fft_and_direct, n):
    import torch

    from fewsound.metrics.cdpam import CDPAMModel, cdpam_inputs

    x = cdpam_inputs(speech[:2, :n], SR)
    y = cdpam_inputs(add_noise(speech[:2, :n], 15.0), SR)
    fft, direct = fft_and_direct
    assert torch.allclose(fft.embed(x), direct.embed(x), rtol=0, atol=2e-6)  # unit-norm embeddings
    d_fft, d_direct = fft.distance(x, y), direct.distance(x, y)
    assert torch.allclose(d_fft, d_direct, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="conv must be"):
        CDPAMModel("cpu", conv="winograd")


def test_cdpam_keeps_reference_embeddings_and_reuses_them(speech, fft_and_direct, monkeypatch):
    import torch

    from fewsound.metrics.cdpam import cdpam_inputs

    model = fft_and_direct[0]
    model.forget_refs()  # what other tests kept
    x = cdpam_inputs(speech[:2, :4000], SR)
    y1, y2 = (cdpam_inputs(add_noise(speech[:2, :4000], db), SR) for db in (10.0, 30.0))
    seen = []
    embed = model.embed
    monkeypatch.setattr(model, "embed", lambda a: seen.append(len(a)) or embed(a))
    first = model.distance(x, y1)
    assert seen == [4]  # both references and both reconstructions, in one pass
    again = model.distance(x, y2)
    assert seen == [4, 2]  # the references' embeddings were kept
    assert torch.equal(model.distance(x, y1), first)  # and give the same numbers
    assert again[0] < first[0] and again[1] < first[1]  # 30 dB is closer than 10 dB
    monkeypatch.setattr(model, "REF_CACHE", 1)
    model.distance(x[:1], y1[:1])
    assert len(model._refs) == 1
    model.forget_refs()
    model.distance(x[:1], y1[:1])
    assert seen[-1] == 2


# ------------------------------------------------------------------- real speech with growing degradations


@pytest.fixture(scope="module")
def degraded(speech):
    """For one clip (0.5 s: PESQ and STOI apply from 1/4 s): {family: [row(mild), row(strong)]} from evaluate()
    with every metric."""
    x = speech[0, : SR // 2]
    cases = {
        "noise": [add_noise(x, 20.0), add_noise(x, 5.0)],
        "low_pass": [low_pass(x, 4000.0), low_pass(x, 1000.0)],
        "clipping": [clip_at(x, 0.3), clip_at(x, 0.05)],
    }
    recs = np.stack([y for ys in cases.values() for y in ys])
    rows = evaluate(np.broadcast_to(x, recs.shape), recs, SR, device="cpu")
    return {name: rows[2 * i : 2 * i + 2] for i, name in enumerate(cases)}


HIGHER_IS_BETTER = {"psnr", "snr", "si_snr", "pesq", "stoi"}


@pytest.mark.parametrize("family", ["noise", "low_pass", "clipping"])
def test_metrics_move_the_right_way(degraded, family):
    mild, strong = degraded[family]
    assert mild["not_applicable"] == {} and strong["not_applicable"] == {}
    assert set(mild) - {"not_applicable"} == set(METRICS)
    for m in METRICS:
        worse = strong[m] < mild[m] if m in HIGHER_IS_BETTER else strong[m] > mild[m]
        assert worse, f"{family}: {m} mild={mild[m]:.4g} strong={strong[m]:.4g}"


def test_pesq_wb_at_10db_white_noise_is_in_the_expected_range(speech):
    """Paper sanity. The pesq package's own example (README and tests/test_pesq.py of ludlows/PESQ: speech.wav vs
    speech_bab_0dB.wav, babble noise at 0 dB) scores 1.083 wide-band; the noisy VoiceBank-DEMAND test set (2.5 to
    17.5 dB SNR) is widely reported at 1.97. White noise at 10 dB fills the 4-8 kHz band and lands in between, near
    the bottom of the P.862.2 scale: 1.0 < PESQ-wb < 2.0. A perfect copy scores the scale's maximum, 4.644
    (= 0.999 + 4 / (1 + exp(-1.3669 * 4.5 + 3.8224)), the P.862.2 mapping of raw PESQ 4.5)."""
    x = speech.astype(np.float32)
    rows = evaluate(x, add_noise(speech, 10.0), SR, metrics=["pesq"])
    rows0 = evaluate(x, add_noise(speech, 0.0), SR, metrics=["pesq"])
    for r, r0 in zip(rows, rows0):
        assert 1.0 < r["pesq"] < 2.0
        assert r0["pesq"] < r["pesq"]
    assert evaluate(x[:1], x[:1], SR, metrics=["pesq"])[0]["pesq"] == pytest.approx(4.644, abs=1e-3)


# -------------------------------------------------------------------- applicability, errors, MLflow keys


def test_non_speech_kinds_report_not_applicable(speech):
    x, y = speech[:1], add_noise(speech[:1], 20.0)
    for kind in ("noisy_speech", "music", "environment"):
        row = evaluate(x, y, SR, kind=kind)[0]
        assert set(row["not_applicable"]) == {"pesq", "stoi", "cdpam"}
        assert all(kind in reason for reason in row["not_applicable"].values())
        assert set(row) == {"mse", "psnr", "snr", "si_snr", "lsd", "wd_hf", "not_applicable"}


def test_no_utterance_and_too_short_are_not_applicable(speech):
    from fewsound.metrics.pesq import pesq_pair

    # evaluate() rejects a silent reference outright (AudioError); PESQ's own failure modes come back as reasons.
    loud = speech[0, :16000].astype(np.float32)
    assert "no utterance" in pesq_pair(np.zeros(16000, np.float32), loud).reason
    assert "1/4 s" in pesq_pair(loud[:3000], loud[:3000]).reason
    # A 0.3 s clip: pystoi keeps < 30 frames and would return 1e-5; we say why instead.
    short = speech[:1, : int(0.3 * SR)]
    row = evaluate(short, add_noise(short, 20.0), SR, metrics=["stoi", "mse"])[0]
    assert "stoi" not in row and "30" in row["not_applicable"]["stoi"] and row["mse"] > 0


def test_all_zero_reconstruction_is_reported_not_nan(speech):
    row = evaluate(speech[:1], np.zeros((1, N)), SR, metrics=["mse", "si_snr", "wd_hf", "snr"])[0]
    assert "wd_hf" in row["not_applicable"] and "si_snr" in row["not_applicable"]
    assert row["snr"] == 0.0 and row["mse"] > 0
    assert not any(isinstance(v, float) and math.isnan(v) for v in row.values())


def test_bad_input_raises_naming_the_clip(speech):
    x = speech[:2]
    with pytest.raises(AudioError, match="shape"):
        evaluate(x, x[:, :-1], SR)
    bad = x.copy()
    bad[1, 100] = np.nan
    with pytest.raises(AudioError, match=r"b\.wav \(reconstruction\).*NaN"):
        evaluate(x, bad, SR, metrics=["mse"], names=["a.wav", "b.wav"])
    with pytest.raises(AudioError, match=r"clip 0 \(reference\).*silent"):
        evaluate(np.zeros_like(x), x, SR, metrics=["mse"])
    with pytest.raises(ConfigError, match="kind"):
        evaluate(x, x, SR, kind="podcast")
    with pytest.raises(ConfigError, match="metric"):
        evaluate(x, x, SR, metrics=["mse", "visqol"])


def test_to_mlflow_uses_the_design_keys(speech):
    row = evaluate(speech[:1], add_noise(speech[:1], 20.0), SR, kind="music")[0]
    flat = to_mlflow(row)
    assert set(flat) == {"eval/mse", "eval/psnr", "eval/snr", "eval/si_snr", "eval/lsd", "eval/wd_hf"}
    assert all(type(v) is float for v in flat.values())
    assert flat["eval/mse"] == row["mse"]
