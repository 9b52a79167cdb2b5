"""The built-in corpus: counts, voices, provenance, checksums, durations, actual sound, size, attribution."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from fewsound.data.builtin import KINDS, BuiltinClip, builtin_corpus, builtin_manifest, builtin_root

FRAME_S, SILENCE_DB = 0.02, -40.0  # same rule as scripts/build_builtin_corpus.py
PAPER_SR, SEGMENT = 22_050, 65_536  # the paper's rate and FewSound segment (3 s)


def active_seconds(x: np.ndarray, sr: int) -> float:
    """Seconds of 20 ms frames whose energy is within 40 dB of the loudest frame."""
    n = int(FRAME_S * sr)
    e = (x[: len(x) // n * n].astype(np.float64).reshape(-1, n) ** 2).mean(axis=1)
    return float((10 * np.log10(e / e.max() + 1e-20) > SILENCE_DB).sum() * FRAME_S)


def autocorr_f0(x: np.ndarray, sr: int, fmin: float = 60.0, fmax: float = 400.0) -> float:
    """Median F0 of loud frames by plain autocorrelation (independent of the pYIN used by the build)."""
    n, hop = int(0.04 * sr), int(0.01 * sr)
    frames = np.lib.stride_tricks.sliding_window_view(x, n)[::hop]
    rms = np.sqrt((frames**2).mean(axis=1))
    f0s = []
    for f in frames[rms > 0.2 * rms.max()]:
        f = f - f.mean()
        ac = np.correlate(f, f, "full")[n - 1 :]
        lo, hi = int(sr / fmax), int(sr / fmin)
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.5 * ac[0]:  # clearly periodic frames only
            f0s.append(sr / lag)
    return float(np.median(f0s))


@pytest.fixture(scope="module")
def manifest():
    return builtin_manifest()


@pytest.fixture(scope="module")
def rows(manifest):
    return {r["clip_id"]: r for r in manifest["clips"]}


def test_counts_kinds_voices_genders(builtin_clips):
    kinds = Counter(c.kind for c in builtin_clips)
    assert set(kinds) == set(KINDS)
    assert kinds["speech"] >= 20 and kinds["music"] >= 5 and kinds["environment"] >= 5, kinds
    speech = [c for c in builtin_clips if c.kind == "speech"]
    voices = {c.speaker: c.gender for c in speech}
    assert len(voices) >= 4, voices
    assert set(voices.values()) == {"female", "male"}, voices
    assert all(Counter(c.speaker for c in speech)[v] >= 3 for v in voices)  # several clips per voice
    assert all(c.gender is None for c in builtin_clips if c.kind != "speech")
    assert len({c.clip_id for c in builtin_clips}) == len(builtin_clips)


def test_distinct_voice_talents(manifest):
    # es-allison and en-allison are the same person: count people, not voice ids
    talents = {r["talent"] for r in manifest["clips"] if r["kind"] == "speech"}
    assert len(talents) >= 4, talents


def test_order_is_stable_and_paths_absolute(builtin_clips):
    assert builtin_clips == builtin_corpus()
    assert builtin_clips == sorted(builtin_clips, key=lambda c: (c.kind, c.speaker, c.clip_id))
    assert all(isinstance(c, BuiltinClip) and c.path.is_absolute() and c.path.is_file() for c in builtin_clips)
    assert builtin_corpus("music") == [c for c in builtin_clips if c.kind == "music"]


def test_checksums_and_headers_match_manifest(builtin_clips, rows):
    for c in builtin_clips:
        assert hashlib.sha256(c.path.read_bytes()).hexdigest() == rows[c.clip_id]["sha256"] == c.sha256, c.clip_id
        info = sf.info(str(c.path))
        assert (info.format, info.subtype, info.channels) == ("FLAC", "PCM_16", 1), c.clip_id
        assert (info.samplerate, info.frames) == (c.sample_rate, c.n_samples), c.clip_id


def test_every_clip_loads_long_enough_with_real_sound(builtin_clips):
    for c in builtin_clips:
        x = c.load()  # 22,050 Hz
        assert x.dtype == np.float32 and x.ndim == 1 and np.isfinite(x).all(), c.clip_id
        assert abs(len(x) - round(c.seconds * PAPER_SR)) <= 2, c.clip_id
        native = c.load(sr=None)
        assert 0.95 <= float(np.abs(native).max()) <= 1.0, f"{c.clip_id}: not peak-normalised"
        assert active_seconds(native, c.sample_rate) >= 1.5, c.clip_id
        if c.kind == "speech":
            # FewSound's split skips 0.5 s then takes 65,536 samples at 22,050 Hz
            assert len(x) >= PAPER_SR // 2 + SEGMENT, f"{c.clip_id}: {c.seconds:.2f} s"
            assert active_seconds(native, c.sample_rate) >= 2.5, c.clip_id
        elif c.kind == "music":
            assert len(x) >= SEGMENT, c.clip_id


def test_music_and_environment_at_least_3s(builtin_clips):
    other = [c for c in builtin_clips if c.kind != "speech"]
    assert all(c.seconds >= 3.0 and active_seconds(c.load(sr=None), c.sample_rate) >= 3.0 for c in other), [
        (c.clip_id, c.seconds) for c in other if c.seconds < 3.0
    ]


def test_trimmed_of_silence(builtin_clips):
    # the build cuts leading/trailing silence (keeping 50 ms): the first and last 100 ms must hold sound
    for c in builtin_clips:
        x = c.load(sr=None)
        n = int(0.1 * c.sample_rate)
        full = active_seconds(x, c.sample_rate)
        assert full > 0
        for edge in (x[:n], x[-n:]):
            e = float((edge.astype(np.float64) ** 2).mean())
            loud = float(np.max(np.convolve(x.astype(np.float64) ** 2, np.ones(n) / n, "valid")))
            assert 10 * np.log10(e / loud + 1e-20) > -60.0, f"{c.clip_id}: silent edge"


def test_speaker_gender_consistent_with_pitch(builtin_clips, rows):
    """The recorded pYIN F0 is reproduced by an independent autocorrelation estimate, and the male voice
    is the lowest-pitched voice. (Pitch is a check, not the source: gender comes from the packages' credits.)"""
    by_voice: dict[str, list[float]] = {}
    for c in builtin_clips:
        if c.kind == "speech":
            by_voice.setdefault(c.speaker, []).append(autocorr_f0(c.load(sr=None), c.sample_rate))
    gender = {c.speaker: c.gender for c in builtin_clips if c.kind == "speech"}
    ours = {v: float(np.median(f)) for v, f in by_voice.items()}
    recorded = {v: float(np.median([r["median_f0_hz"] for r in rows.values() if r["speaker"] == v])) for v in ours}
    for v in ours:
        assert abs(ours[v] - recorded[v]) / recorded[v] < 0.2, (v, ours[v], recorded[v])
    males = [v for v in ours if gender[v] == "male"]
    females = [v for v in ours if gender[v] == "female"]
    assert max(ours[v] for v in males) < min(ours[v] for v in females), ours


def test_voice_table_matches_clips(manifest, builtin_clips):
    voices = manifest["voices"]
    speech = [c for c in builtin_clips if c.kind == "speech"]
    assert set(voices) == {c.speaker for c in speech}
    for c in speech:
        assert (voices[c.speaker]["gender"], voices[c.speaker]["language"]) == (c.gender, c.language), c.clip_id
    assert sum(v["n_clips"] for v in voices.values()) == len(speech)


def test_total_size(builtin_clips):
    total = sum(p.stat().st_size for p in builtin_root().rglob("*") if p.is_file())
    assert total <= 5.5e6, f"{total / 1e6:.2f} MB"


def test_provenance_and_attribution(manifest):
    attribution = (builtin_root() / "ATTRIBUTION.md").read_text()
    packages = {r["source"]["package"] for r in manifest["clips"]}
    assert packages == set(manifest["packages"])
    for pkg in packages:
        assert f"## {pkg} {manifest['packages'][pkg]}" in attribution, pkg
    for r in manifest["clips"]:
        assert r["licence"] in {"CC0-1.0", "CC-BY-3.0", "CC-BY-SA-3.0"}, r["clip_id"]
        assert r["original_files"] and all(f.startswith("/usr/share/") for f in r["original_files"])
        assert f"`{r['path']}`" in attribution, r["clip_id"]  # every file is credited
        if r["kind"] == "speech":
            assert r["gender"] in {"female", "male"} and r["language"] and r["talent"]
    for name in ("Allison Smith", "June Wallack", "Carlo Flora", "Maxim Topal"):
        assert name in attribution


def test_manifest_is_json_roundtrip(manifest):
    path = builtin_root() / "manifest.json"
    # the file is exactly what scripts/build_builtin_corpus.py writes for the manifest the package loads: a
    # hand edit, a re-serialisation or a loader that drops or rewrites a field all break the equality
    assert path.read_text(encoding="utf-8") == json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    assert sorted(p.relative_to(builtin_root()).as_posix() for p in builtin_root().rglob("*.flac")) == sorted(
        r["path"] for r in manifest["clips"]
    )  # no stray or missing audio files


def test_builtin_name_is_prepared_per_node_and_bit_identical(tmp_path, monkeypatch):
    """`builtin:<protocol>`: each machine (here: each FEWSOUND_HOME) prepares its own copy from the package, and
    every copy has the same shards byte for byte, so trials on different nodes read the same clips."""
    from fewsound.data.corpus import open_corpus
    from fewsound.errors import ConfigError

    digests = []
    for node in ("node-a", "node-b"):
        monkeypatch.setenv("FEWSOUND_HOME", str(tmp_path / node))
        corpus = open_corpus("builtin:inr-1.5s")
        assert corpus.location == str(tmp_path / node / "corpora" / "builtin-inr-1.5s")
        assert corpus.manifest["protocol"]["name"] == "inr-1.5s" and len(corpus) > 0
        digests.append([(s["file"], s["sha256"]) for s in corpus.manifest["shards"]])
    assert digests[0] == digests[1]
    with pytest.raises(ConfigError, match="unknown protocol 'inr-9s'"):
        open_corpus("builtin:inr-9s")
