"""Parquet shards + manifest: bit-exact round trip, the paper's protocols, rejection, strict mode, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from fewsound.data.corpus import open_corpus
from fewsound.data.importers import SourceRecord
from fewsound.data.prepare import plan_corpus, prepare_corpus
from fewsound.data.protocols import crop_start, get_protocol, load_crop, split_groups, val_group_count
from fewsound.data.shards import process_shard
from fewsound.errors import AudioError, ConfigError, DataError


@pytest.fixture(scope="module")
def source(tmp_path_factory, builtin_clips) -> Path:
    """A folder of real clips (one sub-folder per built-in speaker) plus one corrupt and one too-short file."""
    root = tmp_path_factory.mktemp("src")
    for c in builtin_clips:
        if c.kind == "speech" or c.speaker.endswith(("garzul", "gowers", "veezay")):
            (root / c.speaker).mkdir(exist_ok=True)
            sf.write(root / c.speaker / f"{c.clip_id}.flac", c.load(sr=None), c.sample_rate, subtype="PCM_24")
    (root / "en-allison" / "broken.wav").write_bytes(b"RIFF" + os.urandom(300))
    sf.write(root / "fr-june" / "short.wav", builtin_clips[0].load()[:30_000], 22_050)
    return root


def _independent_decode(path: Path) -> np.ndarray:
    """The source as libsndfile decodes it (float32, mono files), resampled to 22,050 Hz with torchaudio's
    "kaiser_best" sinc filter as torchaudio documents it: not through fewsound's loader."""
    import torch
    import torchaudio.functional as AF

    x, sr = sf.read(str(path), dtype="float32")
    assert x.ndim == 1, path  # the fixture writes mono files
    if sr == 22_050:
        return x
    y = AF.resample(torch.from_numpy(x), sr, 22_050, lowpass_filter_width=64, rolloff=0.9475937167399596,
                    resampling_method="sinc_interp_kaiser", beta=14.769656459379492)  # fmt: skip
    return y.numpy()


def _shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("*.parquet"))}


def test_fewsound_protocol_round_trip_is_bit_exact(source, tmp_path):
    m = prepare_corpus(source, out=tmp_path, protocol="fewsound", shard_size=5)
    corpus = open_corpus(tmp_path, verify=True)
    assert corpus.manifest == m and set(corpus.splits) == {"train", "validation"}
    clips = list(corpus.clips())
    assert len(clips) == sum(m["counts"].values()) > 20
    cache: dict[str, np.ndarray] = {}
    stored = {}  # clip_id -> the audio cell as pyarrow reads it from the shard files (not through the reader)
    for s in m["shards"]:
        t = pq.read_table(tmp_path / s["file"], columns=["clip_id", "audio"])
        for cid, audio in zip(t.column("clip_id").to_pylist(), t.column("audio").combine_chunks().values.to_numpy()
                              .reshape(t.num_rows, -1)):  # fmt: skip
            stored[cid] = audio
    for c in clips:
        assert c.audio.dtype == np.float32 and c.n_samples == len(c.audio) == 65_536
        assert (c.start - 11_025) % 65_536 == 0  # after the 0.5 s skip, non-overlapping segments
        if c.source_path not in cache:
            cache[c.source_path] = _independent_decode(source / c.source_path)
        want = cache[c.source_path][c.start : c.start + 65_536]
        assert np.array_equal(c.audio.view(np.uint32), want.view(np.uint32))  # bit-exact, NaN-safe
        assert np.array_equal(stored[c.clip_id].view(np.uint32), want.view(np.uint32))
        assert c.clip_id == f"{c.utterance}@{c.start}" and c.peak == np.float32(np.abs(want).max())
    # the reader's other views agree with clips()
    arr, meta = corpus.arrays("train")
    train = [c for c in clips if c.split == "train"]
    assert arr.shape == (len(train), 65_536) and arr.dtype == np.float32
    assert np.array_equal(arr[3], train[3].audio) and meta[3]["clip_id"] == train[3].clip_id
    t = pq.read_table(corpus.shard_paths("validation")[0])
    assert pa.types.is_list(t.schema.field("audio").type) and t.schema.field("audio").type.value_type == pa.float32()
    assert {"clip_id", "speaker", "kind", "split", "sample_rate", "audio", "source_path", "start", "n_samples"} <= set(
        t.column_names
    )


def test_manifest_counts_speakers_and_rejections(source, tmp_path):
    m = prepare_corpus(source, out=tmp_path, protocol="fewsound", shard_size=5)
    assert m["sample_rate"] == 22_050 and m["clip_length"] == 32_768 and m["stored_length"] == 65_536
    assert m["protocol"]["name"] == "fewsound" and m["layout"] == "folder" and m["fewsound_version"]
    # 8 groups (5 voices + 3 music sources, all kind "other" in a plain folder): last max(1, 8 // 5) = 1 is validation
    assert m["speakers"]["validation"] == ["ru-ivrvoice"]
    assert "ru-ivrvoice" not in m["speakers"]["train"]
    rej = {r["path"]: r for r in m["rejected"]}
    assert rej["en-allison/broken.wav"]["fault"] and "unreadable" in rej["en-allison/broken.wav"]["reason"]
    assert not rej["fr-june/short.wav"]["fault"] and "too short" in rej["fr-june/short.wav"]["reason"]
    for s in m["shards"]:
        assert len(s["sha256"]) == 64 and (tmp_path / s["file"]).stat().st_size == s["bytes"]
    assert sum(s["rows"] for s in m["shards"]) == sum(m["counts"].values())


def test_strict_makes_a_corrupt_file_fatal(source, tmp_path):
    with pytest.raises(AudioError, match="broken.wav.*unreadable"):
        prepare_corpus(source, out=tmp_path, protocol="fewsound", strict=True)


def test_inr_protocol_one_clip_per_speaker_seeded(source, tmp_path):
    a = prepare_corpus(source, out=tmp_path / "a", protocol="inr-3s")
    prepare_corpus(source, out=tmp_path / "b", protocol="inr-3s")
    prepare_corpus(source, out=tmp_path / "c", protocol="inr-3s", seed=7)
    ids = lambda d: [x.clip_id for x in open_corpus(d).clips()]  # noqa: E731
    assert ids(tmp_path / "a") == ids(tmp_path / "b")  # same seed: same picks and crops
    assert ids(tmp_path / "a") != ids(tmp_path / "c")
    clips = list(open_corpus(tmp_path / "a").clips("test"))
    assert a["counts"] == {"test": 8} and len({x.speaker for x in clips}) == 8  # one per speaker
    assert {len(x.audio) for x in clips} == {65_536}
    assert len({x.start for x in clips}) > 1  # random crop starts, not all 0
    # a picked file that is corrupt or too short falls back to the next file of its speaker
    assert {r["path"] for r in a["rejected"]} <= {"en-allison/broken.wav", "fr-june/short.wav"}


def test_split_rule_for_few_and_many_speakers():
    assert [val_group_count(n) for n in (1, 2, 5, 9, 10, 49, 50, 110)] == [0, 1, 1, 1, 2, 9, 10, 10]

    def rec(kind, group, split=""):
        return SourceRecord(
            path="/x", rel="x", utterance=f"{group}-1", speaker=group, group=group, kind=kind, split=split
        )

    fs = get_protocol("fewsound")
    vctk = [rec("speech", f"p{225 + i}") for i in range(109)] + [rec("speech", "s5")]
    split = split_groups(vctk, fs)
    val = sorted(g for (_, g), s in split.items() if s == "validation")
    assert val == [f"p{i}" for i in range(325, 334)] + ["s5"]  # the paper's last 10 of 110, s5 included
    assert split[("speech", "p225")] == "train"
    mixed = [rec("speech", s) for s in ("a", "b", "c", "d", "e")] + [rec("music", m) for m in ("m1", "m2")]
    mixed.append(rec("environment", "only"))
    split = split_groups(mixed, fs)
    assert split[("speech", "e")] == split[("music", "m2")] == "validation"  # every kind in both splits ...
    assert split[("environment", "only")] == "train"  # ... unless it has a single group
    assert sum(s == "validation" for s in split.values()) == 2
    # natural order: fold10 sorts after fold9
    folds = split_groups([rec("environment", f"fold{i}") for i in range(1, 11)], fs)
    assert [g for (_, g), s in folds.items() if s == "validation"] == ["fold9", "fold10"]
    # a layout's own split is kept when it has both halves
    libri = [rec("speech", "19", "train"), rec("speech", "103", "train"), rec("speech", "1688", "validation")]
    assert {g: s for (_, g), s in split_groups(libri, fs).items()} == {
        "19": "train",
        "103": "train",
        "1688": "validation",
    }
    with pytest.raises(ConfigError, match="unknown protocol"):
        get_protocol("fewsound-xl")


def test_load_time_crop_random_for_train_fixed_for_validation():
    x = np.arange(65_536, dtype=np.float32)
    starts = [crop_start(65_536, 32_768, split="train", seed=0, index=i) for i in range(200)]
    assert starts == [crop_start(65_536, 32_768, split="train", seed=0, index=i) for i in range(200)]
    assert starts != [crop_start(65_536, 32_768, split="train", seed=1, index=i) for i in range(200)]
    assert starts != [crop_start(65_536, 32_768, split="train", seed=0, index=i, epoch=1) for i in range(200)]
    assert 0 <= min(starts) and max(starts) <= 32_768 and len(set(starts)) > 150
    y = load_crop(x, 32_768, split="train", seed=0, index=5)
    assert y.shape == (32_768,) and y[0] == starts[5] and np.array_equal(np.diff(y), np.ones(32_767))
    assert load_crop(x, 32_768, split="validation", index=5)[0] == 0
    with pytest.raises(AudioError, match="too short"):
        load_crop(x[:100], 32_768, split="train")


def test_resume_rewrites_only_missing_or_damaged_shards(source, tmp_path):
    m1 = prepare_corpus(source, out=tmp_path, protocol="fewsound", shard_size=4)
    before = _shard_stats(tmp_path)
    assert len(before) >= 4
    names = sorted(before)
    # an interrupted import: no manifest, one shard lost, one shard damaged
    (tmp_path / "manifest.json").unlink()
    (tmp_path / names[0]).unlink()
    damaged = tmp_path / names[1]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataError, match="manifest.json: missing"):
        open_corpus(tmp_path)

    plan = plan_corpus(source, out=tmp_path, protocol="fewsound", shard_size=4)
    results = [process_shard(s) for s in plan.shards]
    assert {r.name for r in results if not r.skipped} == {n.removesuffix(".parquet") for n in names[:2]}
    m2 = prepare_corpus(source, out=tmp_path, protocol="fewsound", shard_size=4)
    after = _shard_stats(tmp_path)
    for n in names[2:]:
        assert after[n] == before[n], f"{n} was rewritten"  # same inode and mtime: untouched
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m1["shards"]]  # deterministic content
    assert m2["rejected"] == m1["rejected"] and m2["counts"] == m1["counts"]
    open_corpus(tmp_path, verify=True)

    # a different plan into the same folder replaces everything and leaves no stale shard behind
    m3 = prepare_corpus(source, out=tmp_path, protocol="inr-1.5s", shard_size=4)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == sorted(s["file"] for s in m3["shards"])


def test_reader_errors_name_the_file(source, tmp_path):
    with pytest.raises(DataError, match="no such corpus folder"):
        open_corpus(tmp_path / "nothing")
    prepare_corpus(source, out=tmp_path, protocol="inr-1.5s", shard_size=3)
    corpus = open_corpus(tmp_path)
    with pytest.raises(DataError, match="no split 'train'"):
        corpus.shard_paths("train")
    victim = Path(corpus.shard_paths("test")[1])
    victim.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="checksum mismatch") as e:
        open_corpus(tmp_path, verify=True)
    assert victim.name in str(e.value)
    with pytest.raises(DataError, match="corrupt Parquet shard") as e:
        list(open_corpus(tmp_path).clips())
    assert victim.name in str(e.value)
    victim.unlink()
    with pytest.raises(DataError, match="missing") as e:
        open_corpus(tmp_path)
    assert victim.name in str(e.value)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a fewsound-corpus/1 manifest"):
        open_corpus(tmp_path)


def test_builtin_source_fewsound_split(tmp_path, builtin_clips):
    """The built-in corpus: speech voices, music and environment sources split per kind."""
    m = prepare_corpus("builtin", out=tmp_path, protocol="fewsound")
    assert m["source"] == "builtin" and set(m["counts"]) == {"train", "validation"}
    for split in ("train", "validation"):
        assert set(m["counts_by_kind"][split]) == {"speech", "music", "environment"}
    voices = sorted({c.speaker for c in builtin_clips if c.kind == "speech"})
    assert voices[-1] in m["speakers"]["validation"] and voices[0] in m["speakers"]["train"]
    assert not [r for r in m["rejected"] if r["fault"]]


def test_crop_dataset_train_random_validation_fixed(source, tmp_path):
    from fewsound.data import CropDataset

    prepare_corpus(source, out=tmp_path, protocol="fewsound")
    corpus = open_corpus(tmp_path)
    train, val = CropDataset(corpus, "train"), CropDataset(corpus, "validation", normalize=False)
    assert len(train) == corpus.count("train") and len(val) == corpus.count("validation")
    x = train[2]
    assert x.shape == (32_768,) and x.dtype == np.float32 and np.isclose(np.abs(x).max(), 1.0)
    assert np.array_equal(x, CropDataset(corpus, "train")[2])  # same seed, epoch, index: same crop
    train.set_epoch(1)
    assert not np.array_equal(x, train[2])
    assert np.array_equal(val[0], val.audio[0][:32_768])  # validation: the first 32,768 samples
