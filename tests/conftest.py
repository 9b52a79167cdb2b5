"""Shared fixtures. Tests use real audio (the built-in corpus), real files, real Ray and a real MLflow server.

Two session-wide homes (each a FEWSOUND_HOME with its own MLflow server on a free port, its prepared corpus):
`home` for the sweep-job modules (test_ablation, test_search, test_report_job, test_listen_browser), `env` for the
sweep-engine modules (test_sweep, test_sweep_gpu, test_sweep_resume), so servers, corpora and Ray start once."""

from __future__ import annotations

import os

# CPU tests see no GPU, even on a GPU machine (set before torch or Ray is imported: both read it once): the CPU
# thread split, the emulated fractional GPUs and the bitwise checks assume the CPU. Negative ids, not "": CUDA and
# torch stop at the first negative id (no device), while a local Ray may still declare up to 16 logical GPUs
# (a GPU task gets "-1", ...; Ray refuses num_gpus > 0 when the variable is ""). FEWSOUND_TEST_GPU=1 (what
# benchmarks/gpu_check.sh sets) leaves the devices visible for the gpu tier, tests/test_gpu.py (`-m gpu`).
NO_GPUS = ",".join(str(-i) for i in range(1, 17))
if os.environ.get("FEWSOUND_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = NO_GPUS

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

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


@pytest.fixture(scope="module")
def home(tmp_path_factory, request):
    """The sweep-job modules' FEWSOUND_HOME (its MLflow server starts with the first job; stopped at the end)."""
    import ray

    from fewsound import tracking

    saved = {k: os.environ.get(k) for k in ("FEWSOUND_HOME", "MLFLOW_TRACKING_URI")}
    path = tmp_path_factory.getbasetemp() / "fewsound-sweep-jobs-home"
    if not path.exists():
        path.mkdir()
        request.config.add_cleanup(lambda: (ray.shutdown(), tracking.stop_local_server(path)))
    os.environ["FEWSOUND_HOME"] = str(path)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield path
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def sweep_home(tmp_path_factory, request) -> tuple[Path, str]:
    """The sweep-engine modules' FEWSOUND_HOME and MLflow server (on a free port), started once per session."""
    from fewsound import tracking

    path = tmp_path_factory.getbasetemp() / "sweep-home"
    path.mkdir(exist_ok=True)
    uri = tracking.start_local_server(home=path)  # it picks a free port (and retries if one is taken meanwhile)
    if not getattr(request.config, "_sweep_server_cleanup", False):
        request.config._sweep_server_cleanup = True
        request.config.add_cleanup(lambda: tracking.stop_local_server(path))
    return path, uri


@pytest.fixture(scope="module")
def env(tmp_path_factory, request):
    """(home, MLflow URI) of the sweep-engine modules, set in the environment for the module."""
    path, uri = sweep_home(tmp_path_factory, request)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEWSOUND_HOME", str(path))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield path, uri
