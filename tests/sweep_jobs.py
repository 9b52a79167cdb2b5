"""Loading a job script as a module (the sweep-job test modules run the jobs' main() in-process; their shared
FEWSOUND_HOME is conftest's `home` fixture)."""

from __future__ import annotations

import importlib.util

from support import REPO  # tests/support.py


def job(name: str):
    """A job script (jobs/ is not a package: `ray job submit` runs them as files) as a module."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
