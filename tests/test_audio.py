"""Audio loading and validation on real clips written in many formats, rates and channel counts."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from fewsound.data.audio import (
    TooShort,
    check_samples,
    crop,
    load_audio,
    peak_normalize,
    read_audio,
    resample,
    segment,
)
from fewsound.errors import AudioError


@pytest.fixture(scope="module")
def speech(speech_clips):
    """(float32 [N] at the stored rate, rate) of one real speech clip."""
    c = speech_clips[0]
    x = c.load(sr=None)
    assert x.dtype == np.float32 and x.ndim == 1 and len(x) > 16_000
    return x, c.sample_rate


@pytest.mark.parametrize(
    "suffix,subtype,rate,channels",
    [
        ("wav", "PCM_16", 48_000, 2),
        ("wav", "FLOAT", 44_100, 3),
        ("wav", "PCM_U8", 8_000, 1),
        ("flac", "PCM_24", 16_000, 2),
        ("ogg", "VORBIS", 32_000, 1),
        ("wav", "PCM_16", 22_050, 1),
    ],
)
def test_any_format_rate_and_channels_to_float32_mono_22050(tmp_path, speech, suffix, subtype, rate, channels):
    x, sr = speech
    x = resample(x, sr, rate) * 0.9
    stereo = np.stack([x * (1 - 0.2 * c) for c in range(channels)], axis=1)
    path = tmp_path / f"clip.{suffix}"
    sf.write(path, stereo if channels > 1 else x, rate, subtype=subtype)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - round(len(x) * 22_050 / rate)) <= 1
    # same content: the mono mix, resampled, matches a direct resample of the mix
    ref = resample(stereo.mean(axis=1).astype(np.float32) if channels > 1 else x, rate, 22_050)
    n = min(len(ref), len(y))
    corr = np.corrcoef(ref[:n], y[:n])[0, 1]
    assert corr > (0.9 if subtype in ("VORBIS", "PCM_U8") else 0.999), corr


def test_int16_is_scaled_and_native_rate_kept(tmp_path, speech):
    x, sr = speech
    sf.write(tmp_path / "a.wav", x, sr, subtype="PCM_16")
    y, file_sr = read_audio(tmp_path / "a.wav")
    assert file_sr == sr
    assert np.abs(y - x).max() <= 1 / 32768 + 1e-7  # 16-bit quantisation only
    assert load_audio(tmp_path / "a.wav", sr=None).shape == x.shape


def test_resample_keeps_pitch():
    t = np.arange(16_000) / 16_000
    x = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    y = resample(x, 16_000, 22_050)
    assert len(y) == 22_050
    assert abs(np.argmax(np.abs(np.fft.rfft(y))) - 440) <= 1  # 1 s of audio: bin k = k Hz


def test_peak_normalize_and_normalize_flag(tmp_path, speech):
    x, sr = speech
    sf.write(tmp_path / "q.flac", 0.25 * x / np.abs(x).max(), sr)
    y = load_audio(tmp_path / "q.flac", sr=None, normalize=True)
    assert np.isclose(np.abs(y).max(), 1.0)
    with pytest.raises(AudioError, match="silent"):
        peak_normalize(np.zeros(100, np.float32), where="z")


def _write_bad(tmp_path, case: str):
    p = tmp_path / f"{case}.wav"
    if case == "corrupt":
        p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage that is not audio" * 3)
    elif case == "zero_bytes":
        p.write_bytes(b"")
    elif case == "zero_frames":
        sf.write(p, np.zeros(0, np.float32), 22_050, subtype="FLOAT")
    elif case == "nan":
        x = np.sin(np.linspace(0, 100, 40_000)).astype(np.float32)
        x[1234] = np.nan
        x[999] = np.inf
        sf.write(p, x, 22_050, subtype="FLOAT")
    elif case == "truncated":
        x = np.sin(np.linspace(0, 100, 40_000)).astype(np.float32)
        sf.write(tmp_path / "full.flac", x, 22_050)
        p = tmp_path / "truncated.flac"
        p.write_bytes((tmp_path / "full.flac").read_bytes()[:60])
    return p


@pytest.mark.parametrize(
    "case,message",
    [
        ("corrupt", "unreadable"),
        ("zero_bytes", "zero-length"),
        ("zero_frames", "empty audio"),
        ("nan", "2 NaN/Inf"),
        ("truncated", "unreadable|empty"),
    ],
)
def test_bad_files_raise_audio_error_naming_the_file(tmp_path, case, message):
    p = _write_bad(tmp_path, case)
    with pytest.raises(AudioError, match=message) as e:
        load_audio(p)
    assert str(p) in str(e.value) and e.value.where == str(p)


def test_silent_and_too_short(tmp_path):
    p = tmp_path / "silent.wav"
    sf.write(p, np.full(30_000, 1e-6, np.float32), 22_050, subtype="FLOAT")
    x = load_audio(p)  # loading a silent file is fine ...
    with pytest.raises(AudioError, match="silent") as e:  # ... validating it as a clip is not
        check_samples(x, where=p, allow_silent=False)
    assert str(p) in str(e.value)
    with pytest.raises(TooShort, match="too short: 30000 samples, need at least 32768") as e:
        check_samples(x, where=p, min_length=32_768)
    assert str(p) in str(e.value)
    with pytest.raises(TooShort, match=str(p)):
        crop(x, 32_768, where=p)
    assert crop(x, 1000, start=5).shape == (1000,)
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "missing.wav")


def test_segment_offsets():
    x = np.zeros(11_025 + 2 * 65_536 + 65_535, np.float32)
    assert segment(x, 65_536, skip=11_025) == [11_025, 11_025 + 65_536]  # remainder dropped
    assert segment(x[:76_560], 65_536, skip=11_025) == []
    assert segment(x[:76_561], 65_536, skip=11_025) == [11_025]
