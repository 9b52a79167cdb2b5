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
