"""A search survives a kill: SIGKILL the driver of `jobs/search_inr.py` mid-search, run the same command again,
and the same study goes on (trials that ended are not refitted, the total is what was asked, the paper's
configuration is fitted once). The job runs as a subprocess, as a user runs it (its own local Ray, the shared
MLflow server of the test session). And the study's journal in an object store (a real S3-compatible server)."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import optuna
import psutil
import pytest
from test_sweep import REPO, children  # tests/ is on sys.path (rootdir-relative imports)

EXPERIMENT = "test-search-resume"
TRIALS = 8
CMD = [
    sys.executable,
    str(REPO / "jobs" / "search_inr.py"),
    "--smoke-test",
    "--trials",
    str(TRIALS),
    "--listen-clips",
    "0",
    "--experiment",
    EXPERIMENT,
]


def ended_runs(client) -> int:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return 0
    runs = client.search_runs([exp.experiment_id], "attributes.status != 'RUNNING'", max_results=1000)
    return sum(r.data.tags.get("fewsound.role") in ("trial", "start_point") for r in runs)


def study_trials(home) -> dict[int, tuple]:
    """number -> (outcome, value, completed at, MLflow run id, configuration) of every trial of the (only) study in
    `home` that counts towards --trials. A refit reproduces a seeded trial's outcome and value, not when it
    completed nor the run it logged; the configuration (`configuration`) is what a refit fits again."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    [path] = (home / "search").glob("*.journal")
    storage = JournalStorage(JournalFileBackend(str(path)))
    [summary] = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return {
        t.number: (
            t.user_attrs["outcome"],
            t.value,
            t.datetime_complete,
            t.user_attrs.get("mlflow_run_id"),
            configuration(json.loads(t.user_attrs["point"])),
        )
        for t in study.get_trials()
        if t.user_attrs.get("outcome") in ("finished", "stopped_early", "failed")
    }


def configuration(point: dict) -> tuple:
    """A trial's configuration (its point: family, knobs, lr, widths) as its run logs it: `search.<knob>` params,
    each as text. A trial's lr is sampled from a continuous range, so two trials of a search never share one."""
    return tuple(sorted((k, str(v)) for k, v in point.items()))


def fitted_configurations(runs: list) -> collections.Counter:
    """How many times each configuration was fitted: one child run per fit started (interrupted ones included)."""
    return collections.Counter(
        tuple(sorted((k.removeprefix("search."), v) for k, v in r.data.params.items() if k.startswith("search.")))
        for r in runs
    )


def _kill_driver_and_its_ray(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then wait until the Ray processes that ran trials are gone (the dashboard and
    runtime-env agents may linger: they are ended here, by pid)."""
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    agents = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")

    def is_agent(p):
        try:
            return p.name() in agents
        except psutil.NoSuchProcess:
            return False

    _, alive = psutil.wait_procs([p for p in family if not is_agent(p)], timeout=60)
    assert not alive, [(p.pid, p.name()) for p in alive]
    for p in family:
        if p.is_running() and is_agent(p):
            p.kill()


@pytest.mark.system
def test_sigkill_mid_search_then_rerun_continues_the_same_study(env, tmp_path):
    from mlflow.tracking import MlflowClient

    home, uri = env
    environ = dict(os.environ, FEWSOUND_HOME=str(home), MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(REPO))
    client = MlflowClient(tracking_uri=uri)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(CMD, cwd=REPO, env=environ, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    try:
        while ended_runs(client) < 3:  # kill once 3 of the 8 trials ended (2 run at once: one is in flight)
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "3 trials did not end within 10 minutes"
            time.sleep(0.5)  # each look is a search of the runs: the server works for it
        _kill_driver_and_its_ray(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = study_trials(home)
    assert 1 <= len(before) < TRIALS, f"{len(before)} trials ended before the kill: not mid-search"

    rerun_ms = time.time() * 1000  # MLflow's start times are milliseconds since the epoch
    again = subprocess.run(CMD, cwd=REPO, env=environ, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    # the trials the study had at the kill, plus any that ended just before it without the driver hearing of it
    # (recovered from their MLflow runs, not refitted)
    m = re.search(r"\((\d+) trials already ended, (\d+) to run\)", again.stdout)
    assert m, again.stdout[:1500]
    ended = int(m.group(1))
    assert len(before) <= ended <= len(before) + 2 and int(m.group(2)) == TRIALS - ended, again.stdout[:1500]
    assert f"{ended} trials came from an earlier run of this search" in again.stdout

    after = study_trials(home)
    assert len(after) == TRIALS  # the total is what was asked
    assert {n: after[n] for n in before} == before  # the trials that ended before the kill were not refitted
    assert all(completed is not None and run_id for _, _, completed, run_id, _ in before.values()), before
    runs = {r.info.run_id: r for r in children(client, EXPERIMENT)[1]}
    for number, (_, _, completed, run_id, _) in before.items():  # each one's run is the one it logged before the kill
        assert run_id in runs and runs[run_id].info.start_time <= completed.timestamp() * 1000, (number, run_id)
    parent, kids = children(client, EXPERIMENT)  # the re-run reopened the same parent run
    # the fits actually executed: the re-run started one run per trial it said it would run, and no configuration
    # that a trial fitted before the kill was fitted again (a refit of it, even a new trial's, is one more run)
    started_by_rerun = [r for r in kids if r.info.start_time >= rerun_ms]
    assert len(started_by_rerun) == int(m.group(2)), [r.info.run_name for r in started_by_rerun]
    fits = fitted_configurations(kids)
    refitted = {n: fits[cfg] for n, (*_, cfg) in before.items() if fits[cfg] != 1}
    assert not refitted, f"trials ended before the kill fitted again (trial: fits of its configuration): {refitted}"
    assert parent.info.status == "FINISHED" and parent.data.metrics["search/trials"] == TRIALS
    assert not [r for r in kids if r.info.status == "RUNNING"]
    interrupted = [r for r in kids if r.data.tags.get("fewsound.stopped_early", "").startswith("interrupted")]
    assert len(kids) - len(interrupted) == TRIALS  # one run per counted trial; a trial in flight was refitted
    papers = [r for r in kids if r.data.tags.get("fewsound.start_point") == "paper" and r.info.status == "FINISHED"]
    assert len(papers) == 1


@pytest.mark.integration
def test_study_journal_in_an_object_store_is_found_by_another_machine(s3, tmp_path, monkeypatch):
    """A study kept in s3:// (mirrored locally, uploaded after every change) is loaded by a driver with another
    local home, as after a head node is replaced."""
    from fewsound import storage
    from tune.search.study import StudyStore

    monkeypatch.setenv("FEWSOUND_STORAGE", "s3://fewsound/state")
    monkeypatch.setenv("FEWSOUND_HOME", str(tmp_path / "first"))
    store = StudyStore("search-x")
    study = store.open("search-x", "max", seed=0, n_startup=2)
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)
    study.tell(trial, 1.5)
    store.sync()
    assert storage.exists("s3://fewsound/state/search/search-x.journal")

    monkeypatch.setenv("FEWSOUND_HOME", str(tmp_path / "second"))
    again = StudyStore("search-x")
    assert again.local != store.local and again.local.exists()
    loaded = again.open("search-x", "max", seed=0, n_startup=2)
    assert [(t.value, t.params) for t in loaded.get_trials()] == [(1.5, trial.params)]
