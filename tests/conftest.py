"""Shared fixtures and the test tiers. Tests use real audio (the built-in corpus), real files, real Ray and a real
MLflow server.

Tiers, marked automatically from the fixtures a test uses (or, for what no fixture shows, such as a kill, an
explicit `@pytest.mark.system` / `@pytest.mark.integration`):
- unit: starts no process (a unit test that starts one fails, naming the tier it belongs to);
- integration: a local Ray, an MLflow server, S3 or a job process (INTEGRATION_FIXTURES);
- system: clusters, kills, the browser (SYSTEM_FIXTURES).
`pytest` alone runs the unit tier; `pytest --tier all` (the README's command, CI) runs every tier;
`--tier integration,system` any mix; naming files or `-m` runs what they select, every tier.

Two session-wide homes (each a FEWSOUND_HOME with its own MLflow server on a free port, its prepared corpus):
`home` for the sweep-job modules (test_ablation, test_search, test_report_job, test_listen_browser), `env` for the
sweep-engine modules (test_sweep, test_sweep_gpu, test_sweep_resume), so servers, corpora and Ray start once (once per
worker process under `pytest -n 2`, which keeps a module in one worker: `--dist loadfile`)."""

from __future__ import annotations

import contextlib
import os
import subprocess

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

TIERS = ("unit", "integration", "system", "gpu")
# Fixtures that start a local Ray, an MLflow server, S3 or a job process (their dependants are found too: pytest
# lists every fixture a test uses, directly or through other fixtures).
INTEGRATION_FIXTURES = {"env", "home", "s3", "ray_local", "job_env", "server", "processes"}
# Fixtures that start clusters (a Ray head with workers, emulated autoscaling), a cloud of S3 and servers, a browser.
SYSTEM_FIXTURES = {"cluster", "cloud", "ray_head", "browser"}


def pytest_addoption(parser):
    parser.addoption(
        "--tier",
        default=None,
        help="tiers to run: unit (default without file arguments), integration, system, gpu, or all; comma-separated",
    )


def tier_of(item) -> str:
    marks = {m.name for m in item.iter_markers()}
    names = set(getattr(item, "fixturenames", ()))
    if "gpu" in marks:  # tests/test_gpu.py: needs CUDA (skipped without it, saying so)
        return "gpu"
    if "system" in marks or names & SYSTEM_FIXTURES:
        return "system"
    if "integration" in marks or names & INTEGRATION_FIXTURES:
        return "integration"
    return "unit"


def _selected_tiers(config) -> set[str]:
    text = config.getoption("--tier")
    if text is None:  # files named or -m/-k given: run what they select, in every tier
        explicit = config.args_source != pytest.Config.ArgsSource.TESTPATHS
        text = "all" if explicit or config.option.markexpr or config.option.keyword else "unit"
    tiers = {t.strip() for t in text.split(",") if t.strip()}
    if "all" in tiers:
        return set(TIERS)
    unknown = tiers - set(TIERS)
    if unknown:
        raise pytest.UsageError(f"--tier: unknown tier(s) {', '.join(sorted(unknown))}; use {', '.join(TIERS)} or all")
    return tiers


def pytest_collection_modifyitems(config, items):
    tiers = _selected_tiers(config)
    keep, drop = [], []
    for item in items:
        tier = tier_of(item)
        item.add_marker(getattr(pytest.mark, tier))
        item.stash[TIER] = tier
        (keep if tier in tiers else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    heaviest_files_first(items)


# Under `pytest -n 2 --dist loadfile` each worker takes whole files in this order: the files with system tests first,
# then integration, then unit files (seconds each), so that the last minutes share out small files instead of one
# worker running a long system file while the other waits. Tests keep their order within a file (a stable sort).
_FILE_ORDER = {"system": 0, "gpu": 1, "integration": 2, "unit": 3}


def heaviest_files_first(items) -> None:
    rank: dict[str, int] = {}
    for item in items:
        path = str(item.path)
        rank[path] = min(rank.get(path, _FILE_ORDER["unit"]), _FILE_ORDER[item.stash[TIER]])
    items.sort(key=lambda item: rank[str(item.path)])


def pytest_configure(config):
    # pytest-xdist's loadfile scheduler would hand out the files with the most tests first (--loadscope-reorder,
    # its default): the unit files, leaving the long system files with few tests for the end. Keep the order
    # pytest_collection_modifyitems gives (heaviest_files_first).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_report_header(config):
    return f"tiers: {', '.join(t for t in TIERS if t in _selected_tiers(config))} (--tier all runs every tier)"


TIER = pytest.StashKey[str]()


@pytest.fixture(scope="module", autouse=True)
def _no_ray_outlives_its_module():
    """A local Ray that a module's tests started in this process (a job's main(), run_sweep) is shut down when the
    module ends: an idle Ray costs several percent of a core, and the next modules would run beside it."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


class _NoProcesses:
    """While a unit test sets up and runs, starting a process fails with the reason (its tier is wrong)."""

    def __init__(self, item):
        self.item = item

    def __enter__(self):
        self.original = subprocess.Popen.__init__
        nodeid = self.item.nodeid

        def refuse(popen, args, *a, **kw):
            raise AssertionError(
                f"{nodeid} starts a process ({args!r:.120}) but is in the unit tier: use a fixture that starts it "
                f"({', '.join(sorted(INTEGRATION_FIXTURES))}), or mark it integration/system"
            )

        subprocess.Popen.__init__ = refuse  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc):
        subprocess.Popen.__init__ = self.original  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if item.stash.get(TIER, None) != "unit":
        return (yield)
    with _NoProcesses(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if item.stash.get(TIER, None) != "unit":
        return (yield)
    with _NoProcesses(item):
        return (yield)


class Processes:
    """The processes one test starts, as a user starts them: `run` waits for a command (output captured as text),
    `start` leaves it running. At teardown whatever it started and is still running is killed with its children;
    nothing else (another fixture's Ray head or server) is touched."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def run(self, cmd: list[str], *, timeout: float = 600, check: bool = False, **kw) -> subprocess.CompletedProcess:
        if kw.pop("capture_output", True):
            kw.setdefault("stdout", subprocess.PIPE)
            kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        done = self._wait(self.start(cmd, **kw), cmd, timeout)
        if check:
            done.check_returncode()
        return done

    def start(self, cmd: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("start_new_session", True)  # its own process group: stopped as one, apart from pytest's
        proc = subprocess.Popen(cmd, **kw)
        self.started.append(proc)
        return proc

    def _wait(self, proc: subprocess.Popen, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def stop_all(self) -> None:
        import psutil

        for proc in self.started:
            if proc.poll() is not None:
                continue
            try:
                family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for p in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(family, timeout=10)


@pytest.fixture
def processes():
    """Run commands as subprocesses of this test (jobs, CLIs, servers); what is left running is killed at the end."""
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop_all()


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
