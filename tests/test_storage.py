"""fewsound.storage and a corpus on object storage, against a real S3-compatible server (moto, tests/s3.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fewsound import storage
from fewsound.data.corpus import open_corpus
from fewsound.data.prepare import prepare_corpus
from fewsound.errors import DataError


def test_uris_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.is_uri("s3://b/k") and storage.is_uri("gs://b/k") and not storage.is_uri("data/x")
    assert storage.normalize("data/x") == str(tmp_path / "data" / "x")  # plain paths become absolute
    assert storage.normalize("s3://b/corpus/") == "s3://b/corpus"
    assert storage.join("s3://b/c?endpoint_override=h:9", "receipts", "a.json") == (
        "s3://b/c/receipts/a.json?endpoint_override=h:9"
    )
    assert storage.join("data", "a.parquet") == str(tmp_path / "data" / "a.parquet")
    assert storage.name("s3://b/data/corpus") == "corpus" and storage.name("data/corpus") == "corpus"


def test_local_write_is_atomic_and_listing_ignores_folders(tmp_path):
    target = tmp_path / "a" / "b.bin"
    storage.write_bytes(target, b"x" * 10)
    assert target.read_bytes() == b"x" * 10 and storage.size(target) == 10
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]  # no temp file left behind
    (target.parent / "sub").mkdir()
    assert storage.listdir(target.parent) == ["b.bin"] and storage.listdir(tmp_path / "none") == []
    storage.delete(target)
    storage.delete(target)  # a missing file is fine
    assert not storage.exists(target) and storage.size(target) is None


def test_s3_round_trip_through_the_endpoint_variables(s3, monkeypatch):
    uri = "s3://fewsound/x/blob.bin"
    storage.write_bytes(uri, b"hello")
    assert s3.keys("fewsound") == ["x/blob.bin"]  # the object reached the server, under the right key
    assert storage.read_bytes(uri) == b"hello" and storage.size(uri) == 5 and storage.exists(uri)
    assert storage.listdir("s3://fewsound/x") == ["blob.bin"] and storage.is_dir("s3://fewsound/x")
    assert not storage.is_dir("s3://fewsound/nothing-here")
    # the service-specific AWS_ENDPOINT_URL_S3 alone selects the server too
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert storage.read_bytes(uri) == b"hello"
    storage.delete(uri)
    assert [k for k in s3.keys("fewsound") if not k.endswith("/")] == []  # pyarrow may leave a "x/" marker


def test_corpus_on_s3_resumes_replaces_stale_shards_and_reads_clips(s3, speech_clips, tmp_path):
    """prepare_corpus to s3://: objects in the bucket, nothing local; a re-run keeps every shard (receipts and
    checksums read back); another plan removes the stale shards; clip() reads one row group."""
    import soundfile as sf

    src = tmp_path / "src"
    one_per_voice = list({c.speaker: c for c in speech_clips}.values())  # inr-1.5s: one clip per speaker
    assert len(one_per_voice) == 5
    for c in one_per_voice:
        (src / c.speaker).mkdir(parents=True, exist_ok=True)
        sf.write(src / c.speaker / f"{c.clip_id}.wav", c.load(), 22_050, subtype="PCM_16")
    uri = "s3://fewsound/corpora/speech"
    m = prepare_corpus(src, out=uri, protocol="inr-1.5s", shard_size=2)
    keys = s3.keys("fewsound", "corpora/speech/")
    assert "corpora/speech/manifest.json" in keys and len([k for k in keys if k.endswith(".parquet")]) == 3
    assert json.loads(storage.read_bytes(f"{uri}/manifest.json")) == m
    corpus = open_corpus(uri, verify=True)
    clips = list(corpus.clips())
    assert len(clips) == len(corpus) == sum(m["counts"].values())
    one = corpus.clip(clips[-1].clip_id)
    assert np.array_equal(one.audio, clips[-1].audio) and one.clip_id == clips[-1].clip_id
    assert [i.clip_id for i in corpus.infos()] == [c.clip_id for c in clips]
    with pytest.raises(DataError, match="has no clip 'nope'"):
        corpus.clip("nope")

    from fewsound.data.prepare import plan_corpus
    from fewsound.data.shards import process_shard

    plan = plan_corpus(src, out=uri, protocol="inr-1.5s", shard_size=2)
    assert all(process_shard(s).skipped for s in plan.shards)  # resumable: complete shards are kept
    m2 = prepare_corpus(src, out=uri, protocol="inr-1.5s", shard_size=3)  # another plan replaces the shards
    shards = sorted(k.rsplit("/", 1)[1] for k in s3.keys("fewsound", "corpora/speech/") if k.endswith(".parquet"))
    assert shards == sorted(s["file"] for s in m2["shards"]) and len(shards) == 2
    assert not list(tmp_path.glob("s3*"))

    s3.client().delete_object(Bucket="fewsound", Key=f"corpora/speech/{shards[0]}")
    with pytest.raises(DataError, match="missing") as e:
        open_corpus(uri)
    assert shards[0] in str(e.value)
    with pytest.raises(DataError, match="no such corpus folder"):
        open_corpus("s3://fewsound/corpora/none")
