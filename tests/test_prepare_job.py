"""jobs/prepare_data.py end to end: the real command, a real local Ray, real shards; and bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import soundfile as sf
from support import REPO  # tests/support.py

from fewsound.data.corpus import open_corpus

JOB = REPO / "jobs" / "prepare_data.py"


@pytest.fixture
def run_job(processes):
    """jobs/prepare_data.py with these arguments, as a process (tests/conftest.py's `processes`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}

    def run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
        return processes.run([sys.executable, str(JOB), *args], timeout=timeout, env=env, cwd=REPO)

    return run


def test_builtin_end_to_end_then_resume(tmp_path, run_job):
    out = tmp_path / "corpus"
    p = run_job("--source", "builtin", "--out", str(out), "--num-cpus", "2", "--shard-size", "16")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    corpus = open_corpus(out, verify=True)
    n_shards = len(corpus.manifest["shards"])
    assert n_shards >= 3
    assert f"[{n_shards}/{n_shards}]" in p.stdout and "ETA" in p.stdout  # one progress line per shard
    assert "prepared " in p.stdout and str(out) in p.stdout and "validation" in p.stdout
    assert set(corpus.splits) == {"train", "validation"} and len(corpus) >= 30
    assert {c.kind for c in corpus.clips()} == {"speech", "music", "environment"}

    # the same command again: every shard is complete, none is rewritten
    stats = {q.name: (q.stat().st_ino, q.stat().st_mtime_ns) for q in out.glob("*.parquet")}
    p2 = run_job("--source", "builtin", "--out", str(out), "--num-cpus", "2", "--shard-size", "16")
    assert p2.returncode == 0, p2.stdout + p2.stderr
    assert p2.stdout.count("kept (complete from an earlier run)") == n_shards
    assert stats == {q.name: (q.stat().st_ino, q.stat().st_mtime_ns) for q in out.glob("*.parquet")}
    assert open_corpus(out).manifest["counts"] == corpus.manifest["counts"]


def test_smoke_test_strict_fails_in_one_line_naming_the_file(tmp_path, speech_clips, run_job):
    src = tmp_path / "src"
    for c in speech_clips[:3]:
        (src / c.speaker).mkdir(parents=True, exist_ok=True)
        sf.write(src / c.speaker / f"{c.clip_id}.wav", c.load(), 22_050, subtype="PCM_16")
    bad = src / speech_clips[0].speaker / "aaa-corrupt.wav"  # sorts first: inside the smoke test's shard
    bad.write_bytes(b"RIFF\x00\x01\x00\x00WAVEdata" + b"\x07" * 100)
    p = run_job("--source", str(src), "--out", str(tmp_path / "out"), "--strict", "--smoke-test", "--num-cpus", "1")
    assert p.returncode != 0
    assert "Traceback" not in p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "unreadable" in errors[0], p.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--source", "/nonexistent/vctk"], "/nonexistent/vctk: no such directory"),
        (["--layout", "timit"], "timit: unknown layout"),
        (["--protocol", "inr-9s"], "inr-9s: unknown protocol"),
        (["--source", "EMPTY"], "no audio files found"),
        (["--source", "EMPTY", "--layout", "vctk"], "not a VCTK 0.92 tree"),
    ],
)
def test_bad_input_one_line_error(tmp_path, args, message, run_job):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    p = run_job(*args, "--out", str(tmp_path / "out"), timeout=60)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr + p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
