"""The drivers' shared spine (tune.spine) past MLflow's 1,000-run page: a search's and the Tables 2-6 grid's resume
see every child run of a parent with more than 1,000 of them (MLflow's `search_runs` returns 1,000 when a caller
forgets its paging). Against the session's real MLflow server."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

N = 1_001  # one past MLflow's default page


def _children(client, exp_id: str, parent_id: str, n: int, **log_run_args) -> list[str]:
    from fewsound.tracking import PARENT_TAG, log_run
    from tune.spine import TRIAL_TAG

    extra = log_run_args.pop("tags", {})

    def one(i: int) -> str:
        tags = {PARENT_TAG: parent_id, TRIAL_TAG: str(i), **extra}
        return log_run(client, exp_id, run_name=f"child-{i}", tags=tags, **log_run_args)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(n)))


@pytest.fixture(scope="module")
def experiment(env):
    from mlflow.tracking import MlflowClient

    from fewsound.tracking import get_or_create_experiment

    client = MlflowClient(tracking_uri=env[1])
    return client, get_or_create_experiment(client, "test-spine-paging")


def test_a_grid_and_a_search_resume_see_every_child_past_a_thousand(experiment):
    """1,001 trainings or trials left RUNNING by a killed driver: the grid's stop ends every one of them, and the
    search's resume then finds every one (the ASHA-stopped trials it must not refit)."""
    from fewsound.errors import Stopped
    from fewsound.tracking import MlflowRun
    from tune.hyper import grid as hyper_grid
    from tune.search import driver as search
    from tune.spine import STOPPED_TAG, children_filter, search_runs

    client, exp_id = experiment
    parent = MlflowRun("test-spine-paging", run_name="parent")
    running = _children(client, exp_id, parent.run_id, N, status="RUNNING", tags={STOPPED_TAG: "ASHA at step 1"})
    assert len(set(running)) == N

    with pytest.raises(Stopped):
        hyper_grid._stopped(signal.SIGTERM, {}, parent, {}, N)  # what SIGTERM does to a running grid
    killed = search_runs(client, exp_id, children_filter(parent.run_id, status="KILLED"))
    assert {r.info.run_id for r in killed} == set(running)
    assert client.get_run(parent.run_id).info.status == "KILLED"

    ended = search._ended(parent)  # trial number -> how its run ended: what a resumed search does not refit
    assert all(ended(i) is not None and ended(i)["outcome"] == "stopped_early" for i in range(N))
    assert {ended(i)["mlflow_run_id"] for i in range(N)} == set(running)


def test_a_keyed_run_is_reopened_not_duplicated(experiment):
    """Re-running a driver continues its parent run; a finished training is reported, not reopened."""
    from tune.spine import GRID_TAG, TRAIN_KEY_TAG, open_keyed_run

    client, _ = experiment
    first = open_keyed_run("test-spine-paging", GRID_TAG, "g1", run_name="grid g1")
    assert first.created and client.get_run(first.run.run_id).data.tags["fewsound.role"] == "parent"
    first.run.end("KILLED")
    again = open_keyed_run("test-spine-paging", GRID_TAG, "g1", run_name="grid g1")
    assert again.run.run_id == first.run.run_id and again.status == "KILLED"
    assert client.get_run(again.run.run_id).info.status == "RUNNING"

    train = open_keyed_run("test-spine-paging", TRAIN_KEY_TAG, "t1", run_name="t1", role=None)
    train.run.end("FINISHED")
    done = open_keyed_run("test-spine-paging", TRAIN_KEY_TAG, "t1", run_name="t1", role=None, reopen_finished=False)
    assert done.run.run_id == train.run.run_id and done.status == "FINISHED"
    assert client.get_run(done.run.run_id).info.status == "FINISHED"
