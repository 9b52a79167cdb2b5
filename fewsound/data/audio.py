"""Audio I/O and validation: any file soundfile can read -> float32 mono at a target rate.

Audio I/O goes through `soundfile` (libsndfile), not `torchaudio.load`, whose current backend (torchcodec) is
linked against CUDA and FFmpeg. Resampling uses torchaudio's band-limited sinc resampler.
Every fault of the input raises `AudioError` naming the file and the problem.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf

from fewsound.errors import AudioError


class TooShort(AudioError):
    """The audio is valid but shorter than a crop or segment needs (a protocol's choice, not a faulty file)."""


DEFAULT_SR = 22_050
SILENCE_PEAK = 1e-4  # a clip whose peak |x| is below this is "silent" (about -80 dBFS)
# Suffixes of the formats libsndfile reads; importers look for these (case-insensitive).
AUDIO_SUFFIXES = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64", ".caf", ".rf64"}
)
# The paper resampled with librosa 0.9's default `kaiser_best` (resampy); these are torchaudio's documented
# equivalent settings of that filter, so our 22,050 Hz audio matches the paper's to within filter precision.
_KAISER_BEST = dict(
    lowpass_filter_width=64, rolloff=0.9475937167399596, resampling_method="sinc_interp_kaiser", beta=14.769656459379492
)


def load_audio(path: str | Path, sr: int | None = DEFAULT_SR, *, normalize: bool = False) -> np.ndarray:
    """Read `path` as float32 mono `[N]`, resampled to `sr` (None keeps the file's rate).

    Multichannel audio is averaged to mono; integer PCM is scaled to [-1, 1]. Raises AudioError when the file
    is unreadable, empty, contains NaN/Inf, or (with `normalize`) is silent.
    """
    x, file_sr = read_audio(path)
    if sr is not None and file_sr != sr:
        x = resample(x, file_sr, sr)
    if normalize:
        x = peak_normalize(x, where=path)
    return x


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read `path` at its own rate: (float32 mono [N], sample_rate)."""
    path = Path(path)
    if not path.exists():
        raise AudioError(path, "no such file")
    if path.is_dir():
        raise AudioError(path, "is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(path, "zero-length file (0 bytes)")
    try:
        x, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports corrupt/unknown formats with several exception types
        raise AudioError(path, f"unreadable audio ({type(e).__name__}: {str(e).strip() or 'unknown format'})") from None
    x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    check_samples(x, where=path)
    return np.ascontiguousarray(x, dtype=np.float32), int(file_sr)


def check_samples(x: np.ndarray, where: object, *, min_length: int = 1, allow_silent: bool = True) -> None:
    """Raise AudioError if `x` is empty, shorter than `min_length`, non-finite, or (optionally) silent."""
    if x.size == 0:
        raise AudioError(where, "empty audio (zero samples)")
    if x.shape[-1] < min_length:
        raise TooShort(where, f"too short: {x.shape[-1]} samples, need at least {min_length}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise AudioError(where, f"contains {bad} NaN/Inf sample(s)")
    if not allow_silent and float(np.abs(x).max()) < SILENCE_PEAK:
        raise AudioError(where, f"silent: peak {float(np.abs(x).max()):.2e} is below {SILENCE_PEAK:g}")


def peak_normalize(x: np.ndarray, where: object = "<array>") -> np.ndarray:
    """x / max|x| (the paper normalises every clip by its peak). Silent input raises AudioError."""
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak < SILENCE_PEAK:
        raise AudioError(where, f"silent: peak {peak:.2e} is below {SILENCE_PEAK:g}, cannot peak-normalise")
    return (x / peak).astype(np.float32)


def resample(x: np.ndarray, orig_sr: int, sr: int) -> np.ndarray:
    """Band-limited sinc resampling (torchaudio) of float32 [N] from `orig_sr` to `sr`."""
    if orig_sr == sr:
        return x
    import torch
    import torchaudio.functional as AF

    y = AF.resample(torch.from_numpy(np.ascontiguousarray(x)), int(orig_sr), int(sr), **_KAISER_BEST)
    return y.numpy().astype(np.float32, copy=False)


def crop(x: np.ndarray, length: int, start: int = 0, where: object = "<array>") -> np.ndarray:
    """x[start:start+length]; AudioError if the clip is shorter than that."""
    if x.shape[-1] < start + length:
        raise TooShort(where, f"too short: {x.shape[-1]} samples, need {start + length} for a crop of {length}")
    return x[..., start : start + length]


def segment(x: np.ndarray, length: int, *, skip: int = 0) -> list[int]:
    """Starts of the non-overlapping `length`-sample segments of `x[skip:]` (the remainder is dropped).

    x: [N] -> starts s with x[s:s+length] inside x; empty when N - skip < length.
    """
    assert length > 0 and skip >= 0, (length, skip)
    n = (x.shape[-1] - skip) // length
    return [skip + i * length for i in range(max(n, 0))]


def is_silent(x: np.ndarray) -> bool:
    """True when the peak |x| is below SILENCE_PEAK (also for empty x)."""
    return x.size == 0 or float(np.abs(x).max()) < SILENCE_PEAK


def flac_bytes(x: np.ndarray, sr: int, subtype: str = "PCM_16") -> bytes:
    """x [N] float in [-1, 1] (clipped there) -> FLAC file bytes, quantized to `subtype` (PCM_16 or PCM_24): lossless
    at that bit depth, so what is stored is the signal rounded to it, not the float32 samples."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(x, dtype=np.float32).reshape(-1), -1.0, 1.0), int(sr), format="FLAC",
             subtype=subtype)  # fmt: skip
    return buf.getvalue()


def save_audio(path: str | Path, x: np.ndarray, sr: int = DEFAULT_SR, subtype: str = "FLOAT") -> Path:
    """Write float32 mono `x` to `path` (format from the suffix; WAV float by default). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    if path.suffix.lower() == ".flac" and subtype == "FLOAT":
        subtype = "PCM_24"
    sf.write(str(path), x, int(sr), subtype=subtype)
    return path
