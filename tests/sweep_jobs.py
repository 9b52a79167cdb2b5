"""What the sweep-job test modules (test_ablation, test_search, test_report_job) share: loading a job script as a
module, and one FEWSOUND_HOME (MLflow server, prepared corpus, Ray) for all of them in a pytest session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def job(name: str):
    """A job script (jobs/ is not a package: `ray job submit` runs them as files) as a module."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sweep_jobs_home(tmp_path_factory, request):
    """A FEWSOUND_HOME private to this pytest session (its own MLflow server on a free port, its prepared
    corpus), shared by the sweep-job test modules so the server, corpus and Ray start once; stopped at the end."""
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
