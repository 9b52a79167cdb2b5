"""Every importer layout, built as a tiny tree of real audio (built-in corpus clips converted into the layout's
formats, rates and channel counts), scanned, auto-detected and imported end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fewsound.data.audio import resample
from fewsound.data.corpus import open_corpus
from fewsound.data.importers import detect_layout, scan
from fewsound.data.prepare import prepare_corpus
from fewsound.errors import DataError


def _put(path: Path, x: np.ndarray, sr: int, rate: int, subtype: str, channels: int = 1) -> None:
    """Write real audio `x` (at `sr`) to `path` at `rate` with `channels` (a slightly different mix each)."""
    y = resample(x, sr, rate)
    if channels > 1:
        y = np.stack([y * (1.0 - 0.1 * c) for c in range(channels)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, y, rate, subtype=subtype)


@pytest.fixture(scope="module")
def real(builtin_clips):
    """{kind: [(audio at stored rate, rate), ...]} of real built-in clips."""
    out: dict[str, list] = {}
    for c in builtin_clips:
        out.setdefault(c.kind, []).append((c.load(sr=None), c.sample_rate))
    assert len(out["speech"]) >= 8 and len(out["music"]) >= 4 and len(out["environment"]) >= 4
    return out


def build_vctk(root: Path, real) -> None:
    for i, spk in enumerate(["p225", "p226", "s5"]):
        for u in range(2):
            x, sr = real["speech"][(2 * i + u) % len(real["speech"])]
            for mic in (1, 2):
                _put(root / "wav48_silence_trimmed" / spk / f"{spk}_{u + 1:03d}_mic{mic}.flac", x, sr, 48_000, "PCM_16")
    (root / "wav48_silence_trimmed" / "log.txt").write_text("not audio")


def build_noisy_vctk(root: Path, real) -> None:
    for name, spks in (("trainset_28spk", ["p226", "p227"]), ("testset", ["p232"])):
        for spk in spks:
            x, sr = real["speech"][len(spk) % 5]
            noise = 0.05 * np.random.default_rng(0).standard_normal(len(x)).astype(np.float32)
            _put(root / f"clean_{name}_wav" / f"{spk}_001.wav", x, sr, 48_000, "PCM_16")
            _put(root / f"noisy_{name}_wav" / f"{spk}_001.wav", x + noise, sr, 48_000, "FLOAT")


def build_librispeech(root: Path, real) -> None:
    for split, spks in (("train-clean-100", ["19", "103"]), ("test-other", ["1688"])):
        for k, spk in enumerate(spks):
            x, sr = real["speech"][k + 3]
            _put(root / "LibriSpeech" / split / spk / "198" / f"{spk}-198-0000.flac", x, sr, 16_000, "PCM_16")


def build_ljspeech(root: Path, real) -> None:
    base = root / "LJSpeech-1.1"
    ids = ["LJ001-0001", "LJ001-0002", "LJ002-0001"]
    for k, u in enumerate(ids):
        x, sr = real["speech"][k]
        _put(base / "wavs" / f"{u}.wav", x, sr, 22_050, "PCM_16")
    (base / "metadata.csv").write_text("".join(f"{u}|Text {u}.|Text {u}.\n" for u in ids))


def build_gtzan(root: Path, real) -> None:
    for g, genre in enumerate(["blues", "jazz"]):
        for k in range(2):
            x, sr = real["music"][2 * g + k]
            _put(root / "Data" / "genres_original" / genre / f"{genre}.{k:05d}.wav", x, sr, 22_050, "PCM_16", 2)


def build_urbansound8k(root: Path, real) -> None:
    base = root / "UrbanSound8K"
    rows = []
    for k, (fold, fs_id, label) in enumerate([(1, "100032", "dog_bark"), (1, "100263", "children_playing"),
                                              (2, "100648", "car_horn"), (10, "101281", "siren")]):  # fmt: skip
        x, sr = real["environment"][k]
        name = f"{fs_id}-{k}-0-0.wav"
        _put(base / "audio" / f"fold{fold}" / name, x, sr, 44_100, "FLOAT", 2)
        rows.append([name, fs_id, "0.0", "4.0", "1", str(fold), str(k), label])
    rows.append(["999-1-0-0.wav", "999", "0", "4", "1", "3", "1", "absent"])  # listed but not on disk
    (base / "metadata").mkdir(parents=True)
    with open(base / "metadata" / "UrbanSound8K.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"])
        w.writerows(rows)


def build_folder(root: Path, real) -> None:
    x, sr = real["speech"][5]
    _put(root / "alice" / "take1.ogg", x, sr, 32_000, "VORBIS")
    _put(root / "alice" / "sub" / "take2.wav", x, sr, 8_000, "PCM_U8")
    _put(root / "loose.flac", x, sr, 96_000, "PCM_24", 3)
    (root / "notes.txt").write_text("not audio")


BUILDERS = {
    "vctk": build_vctk,
    "noisy-vctk": build_noisy_vctk,
    "librispeech": build_librispeech,
    "ljspeech": build_ljspeech,
    "gtzan": build_gtzan,
    "urbansound8k": build_urbansound8k,
    "folder": build_folder,
}


@pytest.fixture(scope="module")
def trees(tmp_path_factory, real) -> dict[str, Path]:
    out = {}
    for layout, build in BUILDERS.items():
        root = tmp_path_factory.mktemp(layout)
        build(root, real)
        out[layout] = root
    return out


@pytest.mark.parametrize("layout", list(BUILDERS))
def test_auto_detects_every_layout(trees, layout):
    assert detect_layout(trees[layout]) == layout
    auto, records = scan(trees[layout])
    assert auto == layout
    assert records == scan(trees[layout], layout)[1]  # explicit layout: same records
    assert len({r.utterance for r in records}) == len(records)
    for r in records:
        assert Path(r.path).is_file() and (trees[layout] / r.rel).resolve() == Path(r.path)


def test_vctk_both_mics_speaker_groups(trees):
    _, recs = scan(trees["vctk"], "vctk")
    assert len(recs) == 12 and {r.kind for r in recs} == {"speech"}
    assert sorted({r.speaker for r in recs}) == ["p225", "p226", "s5"]
    assert {r.utterance[-4:] for r in recs} == {"mic1", "mic2"}
    assert all(r.group == r.speaker and r.split == "" for r in recs)


def test_noisy_vctk_pairs_and_split(trees):
    _, recs = scan(trees["noisy-vctk"])
    assert len(recs) == 3 and {r.kind for r in recs} == {"noisy_speech"}
    assert {r.speaker: r.split for r in recs} == {"p226": "train", "p227": "train", "p232": "validation"}
    for r in recs:
        assert r.rel.startswith("noisy_") and r.pair == r.rel.replace("noisy_", "clean_", 1)
        assert (trees["noisy-vctk"] / r.pair).is_file()


def test_librispeech_speakers_and_splits(trees):
    _, recs = scan(trees["librispeech"])
    assert {r.speaker: r.split for r in recs} == {"19": "train", "103": "train", "1688": "validation"}
    assert {r.utterance for r in recs} == {"19-198-0000", "103-198-0000", "1688-198-0000"}


def test_ljspeech_one_voice_grouped_by_book(trees):
    _, recs = scan(trees["ljspeech"])
    assert [r.utterance for r in recs] == ["LJ001-0001", "LJ001-0002", "LJ002-0001"]  # metadata.csv order
    assert {r.speaker for r in recs} == {"LJ"} and [r.group for r in recs] == ["LJ001", "LJ001", "LJ002"]


def test_gtzan_and_urbansound8k_groups_and_labels(trees):
    _, g = scan(trees["gtzan"])
    assert {(r.group, r.kind, r.label) for r in g} == {("blues", "music", "blues"), ("jazz", "music", "jazz")}
    _, u = scan(trees["urbansound8k"])
    assert len(u) == 4  # the slice listed in the csv but absent on disk is skipped
    assert {(r.group, r.speaker, r.label) for r in u} == {
        ("fold1", "100032", "dog_bark"), ("fold1", "100263", "children_playing"),
        ("fold2", "100648", "car_horn"), ("fold10", "101281", "siren"),
    }  # fmt: skip
    assert {r.kind for r in u} == {"environment"}


def test_folder_groups_by_first_subfolder(trees):
    _, recs = scan(trees["folder"], kind="speech")
    assert {r.utterance: r.group for r in recs} == {
        "alice__take1": "alice", "alice__sub__take2": "alice", "loose": "loose"}  # fmt: skip
    assert {r.kind for r in recs} == {"speech"}
    assert {r.kind for r in scan(trees["folder"])[1]} == {"other"}


@pytest.mark.parametrize("layout", list(BUILDERS))
def test_every_layout_imports_end_to_end(trees, layout, tmp_path):
    """INR protocol (one clip per group): every tree becomes a readable corpus of 32,768-sample clips."""
    _, recs = scan(trees[layout])
    m = prepare_corpus(trees[layout], out=tmp_path, protocol="inr-1.5s", shard_size=2)
    assert m["layout"] == layout and m["rejected"] == []
    assert m["counts"] == {"test": len({(r.kind, r.group) for r in recs})}
    corpus = open_corpus(tmp_path, verify=True)
    clips = list(corpus.clips())
    assert len(clips) == len(corpus) and {len(c.audio) for c in clips} == {32_768}
    assert all(c.sample_rate == 22_050 and c.audio.dtype == np.float32 and c.peak > 1e-3 for c in clips)
    assert {c.kind for c in clips} == {r.kind for r in recs}


def test_bad_sources_raise_data_error(tmp_path, trees):
    with pytest.raises(DataError, match="no such directory"):
        scan(tmp_path / "nope")
    with pytest.raises(DataError, match="no audio files found"):
        scan(tmp_path)
    with pytest.raises(DataError, match="unknown layout"):
        scan(trees["vctk"], "timit")
    with pytest.raises(DataError, match="not a VCTK 0.92 tree"):
        scan(trees["gtzan"], "vctk")
    with pytest.raises(DataError, match="not an UrbanSound8K tree"):
        scan(trees["vctk"], "urbansound8k")
