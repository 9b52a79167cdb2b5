"""The persistent Optuna study behind a search, and how Ray Tune drives it.

    store = StudyStore(search_id)                         # storage_root("search")/<search id>.journal
    study = store.open(search_id, "max", seed=0, n_startup=10)
    prepare_resume(study, start_points, encode)           # after a kill: close what was in flight, re-enqueue
    searcher = StudySearcher(study, ["kan"], 34_000, metric="objective", mode="max", on_change=store.sync)

Every Tune trial is one Optuna trial (ask/tell), so the study holds the whole history of a search over any number
of runs of it: TPE samples from all of it, and a re-run counts the trials that ended (`fitted_trials`). Start
points are the study's enqueued trials (Optuna's points to evaluate); `StartPointsRunToEnd` keeps ASHA from
stopping them. A trial's point (what is fitted), outcome, parameter count, run id and metrics are kept on it as
user attributes.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from fewsound import storage
from fewsound.errors import ConfigError
from fewsound.search_space import count_params, suggest_point
from fewsound.storage import default_home
from tune.ray_env import storage_root

MAX_REJECTS = 500  # consecutive over-budget suggestions before giving up
START_KEY = "start_point"  # in a trial's config: the name of the start point it is (absent for sampled trials)
NUMBER_KEY = "optuna_trial"  # in a trial's config: its Optuna trial's number (its run is tagged with it)

# the outcome of a trial, kept on its Optuna trial (user attribute "outcome"): what counts towards `trials`
FITTED = ("finished", "stopped_early", "failed")


class StudyStore:
    """Where the study's journal lives: `storage_root("search")/<search id>.journal`. A remote root (s3://...) is
    mirrored to a local file (the journal backend needs a filesystem with locks), downloaded at start and uploaded
    whole after every change (fewsound.storage: the object appears complete or not at all)."""

    def __init__(self, sid: str):
        self.uri = storage.join(storage_root("search"), f"{sid}.journal")
        _, path = storage.location(self.uri)
        self.remote = not storage.is_local(self.uri)
        if self.remote:
            self.local = default_home() / "search-cache" / f"{sid}.journal"
            self.local.parent.mkdir(parents=True, exist_ok=True)
            if storage.exists(self.uri):
                storage.download_file(self.uri, self.local)
            elif self.local.exists():
                self.local.unlink()  # a stale mirror of a study the store no longer has
        else:
            self.local = Path(path)
            self.local.parent.mkdir(parents=True, exist_ok=True)

    def open(self, sid: str, mode: str, seed: int, n_startup: int) -> optuna.Study:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.create_study(
            study_name=sid,
            storage=JournalStorage(JournalFileBackend(str(self.local))),
            direction="maximize" if mode == "max" else "minimize",
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup),
            load_if_exists=True,
        )

    def sync(self) -> None:
        if self.remote:
            storage.upload_file(self.local, self.uri)


def fitted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that count towards `trials`: fitted to the end, stopped by ASHA, or failed (not rejections
    over the budget, not trials interrupted by a kill)."""
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("outcome") in FITTED]


def prepare_resume(
    study: optuna.Study,
    points: list[tuple[str, dict[str, Any]]],
    encode: Callable,
    ended: Callable[[int], dict[str, Any] | None] = lambda number: None,
) -> int:
    """After a kill: settle the trials a killed driver left RUNNING, and enqueue every start point that has not
    ended yet. Returns the number of trials that will be refitted.

    ended(number): what the trial's own record says about a RUNNING trial (its MLflow run): a dict of
    user attributes with "outcome" and, for "finished", "value", when it ended before the driver heard of it (the
    trial is then re-added as ended, with its parameters, so it counts and TPE learns from it), else None: the
    trial is closed FAIL without an outcome (not counted; another trial takes its place).
    """
    refit = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = ended(t.number)
        study.tell(t.number, state=TrialState.FAIL)
        if record is None:
            refit += 1
            continue
        attrs = {**t.user_attrs, **{k: v for k, v in record.items() if k != "value"}}
        finished = record["outcome"] == "finished"
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE if finished else TrialState.PRUNED,
                value=float(record["value"]) if finished else None,
                params=t.params,
                distributions=t.distributions,
                user_attrs=attrs,
                intermediate_values=t.intermediate_values,
            )
        )
    have = {
        t.user_attrs.get(START_KEY)
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get("outcome") in FITTED or t.state == TrialState.WAITING
    }
    for name, point in points:
        if name not in have:
            study.enqueue_trial(encode(point), user_attrs={START_KEY: name, "point": json.dumps(point)})
    return refit


class StudySearcher(Searcher):
    """Ray Tune searcher over a persistent Optuna study (ask/tell): every suggestion is an Optuna trial; the start
    points are the study's enqueued trials; suggestions over the budget are told PRUNED and never reach Tune."""

    def __init__(
        self,
        study: optuna.Study,
        families: list[str],
        max_params: int | None,
        *,
        metric: str,
        mode: str,
        on_change: Callable[[], None],
    ):
        super().__init__(metric=metric, mode=mode)
        self.study, self.families, self.max_params, self.on_change = study, families, max_params, on_change
        self.live: dict[str, optuna.Trial] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        for _ in range(MAX_REJECTS):
            ot = self.study.ask()
            point = suggest_point(ot, self.families, self.max_params)
            start = ot.user_attrs.get(START_KEY)
            if start:  # a start point is fitted exactly as named (its Optuna parameters only approximate it)
                point = json.loads(ot.user_attrs["point"])
            n = count_params(point["family"], point)
            ot.set_user_attr("num_params", n)
            ot.set_user_attr("point", json.dumps(point))
            if self.max_params is None or n <= self.max_params:
                ot.set_user_attr("tune_trial_id", trial_id)
                self.live[trial_id] = ot
                self.on_change()
                return {**point, NUMBER_KEY: ot.number, **({START_KEY: start} if start else {})}
            ot.set_user_attr("outcome", "rejected")
            self.study.tell(ot, state=TrialState.PRUNED)
        raise ConfigError(
            "--max-params", f"{MAX_REJECTS} suggestions in a row were over {self.max_params:,} parameters"
        )

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        ot = self.live.get(trial_id)
        if ot is not None and result.get("final") != 1 and math.isfinite(result.get(self.metric, math.nan)):
            ot.report(float(result[self.metric]), int(result["steps"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot = self.live.pop(trial_id, None)
        if ot is None:
            return
        result = result or {}
        for key in ("mlflow_run_id", "steps", "per_clip"):
            if key in result:
                ot.set_user_attr(key, result[key])
        ot.set_user_attr("metrics", {k: v for k, v in result.items() if k.startswith("eval/")})
        value = result.get(self.metric)
        if error or value is None or not math.isfinite(value):
            ot.set_user_attr("outcome", "failed")
            self.study.tell(ot, state=TrialState.FAIL)
        elif result.get("final") == 1:
            ot.set_user_attr("outcome", "finished")
            self.study.tell(ot, float(value))
        else:  # stopped by ASHA: TPE ranks a pruned trial by the last value it reported
            with warnings.catch_warnings():  # Tune hands the result that stopped it here, not to on_trial_result
                warnings.simplefilter("ignore")  # (a step already reported is ignored, with a warning)
                ot.report(float(value), int(result.get("steps", 0)))
            ot.set_user_attr("outcome", "stopped_early")
            self.study.tell(ot, state=TrialState.PRUNED)
        self.on_change()

    def save(self, checkpoint_path: str) -> None:  # the study is its own state; Tune's checkpoint says where
        Path(checkpoint_path).write_text(json.dumps({"study": self.study.study_name}))

    def restore(self, checkpoint_path: str) -> None:
        pass


class StartPointsRunToEnd(ASHAScheduler):
    """ASHA that never stops a start point: their results still set the rungs' cut-offs, but they always run
    every step, so the best of the search is compared with them at equal steps."""

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if trial.config.get(START_KEY) else decision
