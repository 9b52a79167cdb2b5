"""Resume: SIGTERM the job's driver mid-sweep, then SIGKILL it mid-sweep, run the same command again, and every fit
ends with exactly one FINISHED run; the fits finished (or only recorded, fewsound.records) before a stop are not
redone. The job runs as a subprocess, as a user runs it (its own local Ray, the shared MLflow server of the test
session)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_sweep import REPO, children  # tests/ is on sys.path (rootdir-relative imports)

from tune.spine import FIT_KEY_TAG

EXPERIMENT = "test-resume"
# 5 clips x 2 families: fits enough that the sweep is still mid-way at both stops (the SIGTERM comes once a second
# driver has been refused, and fits go on meanwhile)
CLIPS = 5
FITS = 2 * CLIPS
CMD = [
    sys.executable,
    str(REPO / "jobs" / "fit_inrs.py"),
    "--smoke-test",
    "--clips",
    str(CLIPS),
    "--pack-size",
    "1",
    "--listen-clips",
    "0",  # no listening page: what resume leaves is the fits and their runs (test_sweep checks the page)
    "--experiment",
    EXPERIMENT,
]


@pytest.fixture(scope="module")
def job_env(env):
    """The job's environment (conftest's sweep home and server) and the MLflow URI."""
    home, uri = env
    return dict(os.environ, FEWSOUND_HOME=str(home), MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(REPO)), uri


def recorded(environ: dict) -> dict[str, float]:
    """key -> computed-at time of every fit record of the experiment (a fit computed again gets a new one)."""
    out = {}
    for p in (Path(environ["FEWSOUND_HOME"]) / "records" / EXPERIMENT).glob("*/*/record.json"):
        d = json.loads(p.read_text())
        out[d["key"]] = d["computed_at"]
    return out


def finished(client) -> dict[str, str]:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=1000)
    return {r.info.run_id: r.data.tags[FIT_KEY_TAG] for r in runs if FIT_KEY_TAG in r.data.tags}


def _is_agent(p: psutil.Process) -> bool:
    try:
        return p.name() in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
    except psutil.NoSuchProcess:
        return False


def _sigterm_mid_sweep(environ: dict, client) -> dict[str, str]:
    """Run the sweep, refuse a second driver of it, SIGTERM the first once a fit finished: the trials stop, the
    driver ends within seconds with one line and exit code 143, nothing is recorded FAILED, no run stays RUNNING.
    Returns the FINISHED runs (run id -> fit key)."""
    proc = subprocess.Popen(CMD, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600

    def parent_open() -> bool:  # the driver opens the sweep's parent run once it holds the sweep's lease
        exp = client.get_experiment_by_name(EXPERIMENT)
        return bool(exp and client.search_runs([exp.experiment_id], "tags.`fewsound.role` = 'parent'"))

    def wait_for(event, what: str) -> None:
        while not event():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"{what} within 10 minutes"
            time.sleep(0.5)  # each look is a search of the runs: the server works for it

    second = None
    try:
        wait_for(parent_open, "the sweep did not open its parent run")
        # a second terminal running the same command meanwhile is refused: no fit is computed twice. It starts
        # (a fresh interpreter: seconds of imports) while the first fits, not after its first fit: the first must
        # still be fitting when the SIGTERM comes
        second = subprocess.Popen(CMD, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: finished(client), "no fit finished")
        second_out, second_err = second.communicate(timeout=300)
        assert second.returncode == 2, second_out + second_err
        line = second_err.strip().splitlines()[-1]
        assert line.startswith("error: fit_inrs-") and "another driver is running this sweep" in line, second_err
        assert f"(pid {proc.pid} on " in line and "Traceback" not in second_err
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        stop_seconds = time.monotonic() - t0
    finally:
        for p in (proc, second):
            if p is not None and p.poll() is None:
                p.kill()
    assert proc.returncode == 143, out + err
    assert stop_seconds < 60, stop_seconds
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: ") and "re-run the same command" in last, err
    assert "Traceback" not in out + err  # nor the trials' (Ray ends their actors with SIGTERM: tune.ray_env)
    parent, kids = children(client, EXPERIMENT)
    assert parent.info.status == "KILLED"
    assert {r.info.status for r in kids} <= {"FINISHED", "KILLED"}, [(r.info.run_name, r.info.status) for r in kids]
    return finished(client)


def _sigkill_mid_sweep(environ: dict, client, log_path: Path, already: dict[str, str]) -> dict[str, str]:
    """Run the sweep again and SIGKILL its driver as soon as one more fit is FINISHED; wait until the Ray processes
    that run trials are gone. Returns the FINISHED runs."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(CMD, cwd=REPO, env=environ, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    try:
        while len(finished(client)) <= len(already):  # 1 fit per trial, 2 trials at a time
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "no fit finished within 10 minutes"
            time.sleep(0.5)
        family = psutil.Process(proc.pid).children(recursive=True)  # its local Ray: GCS, raylet, workers
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    # Ray's processes share the driver's fate: wait until the ones that run trials are gone, so none logs anything
    # afterwards (Ray's dashboard and runtime-env agents may linger: they are ended here, by pid)
    workers = [p for p in family if not _is_agent(p)]
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, [(p.pid, p.name()) for p in alive]
    for p in family:
        if p.is_running() and _is_agent(p):
            p.kill()
    return finished(client)


@pytest.mark.system
def test_sigterm_then_sigkill_mid_sweep_then_a_rerun_finishes_every_fit_exactly_once(job_env, tmp_path):
    """One sweep stopped twice, as a scheduler (SIGTERM) and the OOM killer or a lost node (SIGKILL of the driver)
    stop it, then finished by the same command: after the SIGTERM the command fits only what was left; every fit
    ends with exactly one FINISHED run, and the fits finished (or only recorded, fewsound.records) before the kill
    are not redone."""
    from mlflow.tracking import MlflowClient

    environ, uri = job_env
    client = MlflowClient(tracking_uri=uri)
    stopped = _sigterm_mid_sweep(environ, client)

    before = _sigkill_mid_sweep(environ, client, tmp_path / "killed.log", stopped)
    killed_log = (tmp_path / "killed.log").read_text()
    # the run after the SIGTERM fitted only what was left (and a fit in flight at the SIGTERM is fitted again)
    assert f"{FITS} fits: {len(stopped)} already finished, {FITS - len(stopped)} to run" in killed_log, killed_log[
        -3000:
    ]
    assert set(stopped) <= set(before)
    assert len(stopped) < len(before) < FITS, f"{len(before)} fits finished before the kill: not mid-sweep"
    records = recorded(environ)  # every FINISHED run's fit, and maybe a fit computed but not logged yet
    assert set(before.values()) <= set(records)

    again = subprocess.run(CMD, cwd=REPO, env=environ, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    n = len(records)
    assert f"{FITS} fits: {n} already finished, {FITS - n} to run" in again.stdout
    assert f"{FITS} fits: {FITS - n} done now, {n} already finished, 0 failed" in again.stdout
    assert {k: v for k, v in recorded(environ).items() if k in records} == records  # none computed again

    after = finished(client)
    keys = list(after.values())
    assert len(keys) == FITS and len(set(keys)) == FITS  # every fit exactly one FINISHED run
    assert set(before) <= set(after)  # the runs finished before the kill are the ones that count: not redone
    parent, kids = children(client, EXPERIMENT)  # the re-runs reopened the same parent run
    assert parent.info.status == "FINISHED"
    assert not [r for r in kids if r.info.status == "RUNNING"]  # a fit in flight at the kill was marked KILLED


def test_stop_on_signal_turns_signals_into_a_flag_and_restores_the_handlers():
    from tune.spine import StopOnSignal

    before = signal.getsignal(signal.SIGINT)
    with StopOnSignal() as stop:
        assert not stop.stopper.stop_all() and os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # Python runs the handler between bytecodes
        assert stop.signal == signal.SIGINT and stop.stopper.stop_all() and stop.stopper("trial", {})
        with pytest.raises(KeyboardInterrupt):  # a second signal: stop at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGINT) is before
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ


def test_interrupt_on_signal_raises_in_the_main_thread_and_keeps_the_signal():
    """What Ray Train's driver uses (`trainer.fit()` has no stop API): SIGTERM becomes an exception here."""
    from tune.spine import Interrupted, StopOnSignal

    before = signal.getsignal(signal.SIGTERM)
    guard = StopOnSignal(interrupt=True)
    with pytest.raises(Interrupted), guard:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert guard.signal == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
