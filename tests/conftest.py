"""Shared fixtures. Tests use real audio (the built-in corpus), real files, real Ray and a real MLflow server."""

from __future__ import annotations

import os

import pytest

# Keep every test process to one BLAS/torch thread: CI has 2 cores and Ray workers run beside pytest.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def builtin_clips():
    """The built-in corpus shipped inside the package (real speech, music, environmental sound)."""
    from fewsound.data.builtin import builtin_corpus

    clips = builtin_corpus()
    assert clips, "the built-in corpus is empty"
    return clips


@pytest.fixture(scope="session")
def speech_clips(builtin_clips):
    return [c for c in builtin_clips if c.kind == "speech"]


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A real S3-compatible server (moto, tests/s3.py) with bucket "fewsound", and this process's AWS_*
    variables pointing at it (subprocesses inherit them)."""
    from s3 import MotoS3  # tests/s3.py (tests/ is on sys.path)

    with MotoS3(tmp_path / "moto.log") as server:
        for k, v in server.env.items():
            monkeypatch.setenv(k, v)
        server.create_bucket("fewsound")
        yield server
