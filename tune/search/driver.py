"""Hyper-parameter search of INR families under a parameter budget: an Optuna study (TPE) driven through Ray Tune,
with ASHA early stopping, that starts from the paper's configuration and survives a kill.

    summary = run_search(SearchSpec(families=("kan",), ...), trials=200, max_params=34_000)

- Start points: the paper's configuration of every searched family (and the configurations the user names) are
  the study's first trials (enqueued in Optuna: its points to evaluate), fitted on the same clips and steps as
  every other trial. ASHA never stops a start point (`StartPointsRunToEnd`), and the best is taken over every
  trial that ran all its steps, start points included: the search never returns less than the paper's
  configuration, and its table says when the paper's configuration stayed best.
- Space (fewsound.search_space.suggest_point): define-by-run; several families make "family" a categorical.
  Under `max_params` the sampler draws a parameter target between half the budget and the budget and derives
  the widths from it, so trials spend the budget. A suggestion still over the budget is never fitted: it is
  told PRUNED (tagged rejected) and the sampler asks again.
- A trial fits ONE configuration on a small pack of clips (the packed engine) for `steps`, and reports the
  objective (mean over the pack) after each of `chunks` equal chunks; ASHA stops poor trials at its rungs. The
  objective is read off the reconstruction the loss has just scored (fewsound.fit's `loss_fn` hook).
- Resume: the study is an Optuna journal in the sweep's storage (`storage_root("search")`: $FEWSOUND_STORAGE or
  the local home; a remote one is mirrored locally and uploaded after every change), named by what defines the
  search (families, objective, clips, steps, budget, start points, seed; not the number of trials). Re-running
  the same command continues it: trials that ended are not refitted, TPE samples from the whole history, and
  the total is `trials` (a trial cut off by the kill is refitted; one whose run ended before its result reached
  the driver is recovered from its run, tagged with its Optuna trial's number). A larger `trials` extends a
  finished search. Tune's own state lives beside it (`storage_root("ray_results")`), one Tune run per attempt.
- MLflow: one parent run per search (reopened on resume); each trial a child run (params, the objective after
  every chunk, final metrics, and for trials that ran every step each clip's audio and spectrogram); a trial
  ASHA stopped ends KILLED with the step it reached. The parent gets the comparison with the start points, every
  trial as CSV, the importances and plots (tune.search.report) and the listening page.
- Held-out validation (`validate`, tune.search.heldout): after the trials, the start points and the best trials
  are refitted on clips no trial used, as a sweep of child runs of the same parent (resumable by fit key), and
  compared with the paper's configuration clip by clip: intervals, Wilcoxon tests, a verdict.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from fewsound import storage
from fewsound.config import cfg_hash
from fewsound.errors import ConfigError, Stopped
from fewsound.search_space import (
    KNOBS,
    MODES,
    count_params,
    encode_point,
    objective_metrics,
    smallest_params,
    start_point,
)
from fewsound.tracking import MlflowRun, tracking_uri
from tune.lease import take_lease
from tune.ray_env import (
    capacity,
    fraction_text,
    init_ray,
    quiet_defaults,
    storage_root,
    trial_resources,
    trial_slots,
)
from tune.search.heldout import HeldOut, validate_search
from tune.search.progress import SearchProgress, print_start
from tune.search.report import finish_parent
from tune.search.results import PAPER, SearchContext, SearchSpec, SearchSummary, summarize_study, trial_row
from tune.search.study import (
    StartPointsRunToEnd,
    StudySearcher,
    StudyStore,
    fitted_trials,
    prepare_resume,
)
from tune.search.trial import search_trainable
from tune.spine import (
    FAMILY_TAG,
    JOB_TAG,
    PER_CLIP_TAG,
    SEARCH_TAG,
    STOPPED_TAG,
    TRIAL_TAG,
    TRIALS_TAG,
    StopOnSignal,
    children_filter,
    mark_stale,
    open_keyed_run,
    search_runs,
)


def search_id(spec: SearchSpec, max_params: int | None, points: list[tuple[str, dict[str, Any]]]) -> str:
    """What defines a search (so that the same command finds its study again): not the number of trials. The MLflow
    experiment is part of it, as a sweep's records are per experiment: the same search logged to another experiment
    is a study of its own there (it would otherwise find the other experiment's trials ended and log nothing)."""
    keys = ("families", "clips", "kind", "length", "steps", "chunks", "objective", "seed", "experiment")
    what: dict[str, Any] = {k: getattr(spec, k) for k in keys}
    what.update(corpus=storage.name(str(spec.corpus)), weights=spec.weights, max_params=max_params)
    what["start_points"] = points
    name = "+".join(spec.families) if len(spec.families) < len(KNOBS) else "any"
    return f"search-{name}-{spec.objective}-{cfg_hash(what)}"


def start_points(families: list[str], start_from: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, point): the paper's configuration of each family, then each `start_from` configuration (a dict of
    overrides of a family's paper configuration; "family" defaults to the first searched family)."""
    points = [(PAPER if len(families) == 1 else f"{PAPER} {f}", start_point(f)) for f in families]
    for i, overrides in enumerate(start_from):
        over = dict(overrides)
        family = str(over.pop("family", families[0]))
        if family not in families:
            raise ConfigError("--start-from", f"family {family!r} is not searched ({', '.join(families)})")
        try:
            points.append((f"start {i + 1}", start_point(family, over)))
        except ConfigError as e:
            raise ConfigError("--start-from", f"configuration {i + 1}: {e}") from None
    return points


def run_search(
    spec: SearchSpec | dict[str, Any],
    *,
    trials: int,
    max_params: int | None,
    start_from: list[dict[str, Any]] | None = None,
    grace_chunks: int = 1,
    reduction_factor: int = 2,
    concurrency: int | None = None,
    address: str | None = None,
    gpu_fraction: float = 0.25,
    listen_clips: int | None = None,
    progress: bool = True,
    validate: HeldOut | None = None,
) -> SearchSummary:
    """Run (or resume) the search described by `spec` (a SearchSpec, or its fields by keyword). concurrency: most
    trials at once (None: as many as the cluster runs, tune.ray_env). validate: after the trials, refit the best
    configurations and the start points on held-out clips and compare them with the paper's configuration
    (tune.search.heldout; the outcome is `summary.heldout`)."""
    spec = SearchSpec.of(spec)
    _check_search(spec, trials, max_params)
    families = list(spec.families)
    points = start_points(families, start_from or [])
    mode = MODES[spec.objective]
    quiet_defaults()
    t0 = time.perf_counter()
    sid = search_id(spec, max_params, points)
    store = StudyStore(sid)
    study = store.open(sid, mode, spec.seed, n_startup=min(10, max(2, trials // 5)))
    lease = take_lease(tracking_uri(), spec.experiment, sid)  # a second driver of this search is refused
    parent = _open_search_parent(spec, sid, trials, max_params)
    ctx = SearchContext.under(spec, parent.run_id, parent.uri)
    fitting = _fitting_start_points(points, max_params)
    interrupted = prepare_resume(study, fitting, lambda p: encode_point(p, families, max_params), _ended(parent))
    _mark_stale(parent)
    store.sync()
    done_before = len(fitted_trials(study))
    todo = max(0, trials - done_before)
    if progress:
        print_start(ctx, trials, mode, max_params, fitting, store.uri, done_before, todo, interrupted)
    if todo:
        searcher = StudySearcher(study, families, max_params, metric="objective", mode=mode, on_change=store.sync)
        scheduler = StartPointsRunToEnd(
            time_attr="training_iteration",
            max_t=ctx.chunks,
            grace_period=grace_chunks,
            reduction_factor=reduction_factor,
        )
        progress_cb = SearchProgress(trials, done_before, mode, t0) if progress else None
        with StopOnSignal() as stop:
            grid = _tune(
                ctx,
                searcher,
                scheduler,
                todo,
                f"{sid}-{time.strftime('%Y%m%d-%H%M%S')}",
                progress_cb,
                address=address,
                gpu_fraction=gpu_fraction,
                concurrency=concurrency,
                stopper=stop.stopper,
            )
        _close_dead_trials(grid, parent)
        if stop.signal is not None:
            _stopped(stop.signal, store, study, lease, parent, trials, done_before)
    store.sync()
    summary = summarize_study(study, parent, ctx, mode, done_before, t0)
    summary.experiment_id = parent.experiment_id
    finish_parent(parent, study, summary, ctx, max_params, listen_clips)
    try:
        if validate is not None and summary.best:
            rows = [trial_row(t) for t in fitted_trials(study)]
            run = dict(address=address, gpu_fraction=gpu_fraction, concurrency=concurrency, progress=progress)
            summary.heldout = validate_search(summary, rows, ctx, validate, validate.corpus or ctx.corpus, **run)
    finally:
        lease.release()
    return summary


def _stopped(signum: int, store: Any, study: Any, lease: Any, parent: MlflowRun, trials: int, before: int) -> None:
    """After SIGINT/SIGTERM stopped the trials: the study synced, the lease released, the parent KILLED; raises
    Stopped with what ended (a re-run continues the same study)."""
    store.sync()
    lease.release()
    parent.end("KILLED")
    ended = len(fitted_trials(study))
    raise Stopped(
        signum,
        f"{ended} of {trials} trials ended ({ended - before} in this run); re-run the same command to "
        f"continue the same study ({store.uri}): ended trials are not refitted",
    )


def _fitting_start_points(
    points: list[tuple[str, dict[str, Any]]], max_params: int | None
) -> list[tuple[str, dict[str, Any]]]:
    """The start points within the budget (one over it is never fitted, and the printout says so)."""
    fitting = []
    for name, p in points:
        n = count_params(p["family"], p)
        if max_params is not None and n > max_params:
            print(
                f"[search_inr] start point {name!r} has {n:,} parameters, over the budget of {max_params:,}: "
                "not fitted",
                flush=True,
            )
        else:
            fitting.append((name, p))
    return fitting


def _tune(
    ctx: SearchContext,
    searcher: StudySearcher,
    scheduler: ASHAScheduler,
    todo: int,
    name: str,
    callback: tune.Callback | None,
    *,
    address: str | None,
    gpu_fraction: float,
    concurrency: int | None,
    stopper: Any = None,
) -> Any:
    """One Tune run of `todo` trials, its state under storage_root("ray_results") (a folder per attempt: the
    study, not Tune's state, is what a re-run resumes from)."""
    cap = capacity(init_ray(address))
    resources = trial_resources(cap, gpu_fraction)
    if callback is not None:
        print(
            f"[search_inr] planning for {cap.describe()}: {trial_slots(cap, resources, concurrency)} trials at once "
            f"of {fraction_text(resources)}" + (f"; capped by --concurrency {concurrency}" if concurrency else ""),
            flush=True,
        )
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(search_trainable, ctx=ctx), resources),
        tune_config=tune.TuneConfig(
            metric="objective",
            mode=searcher.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=todo,
            reuse_actors=True,
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(
            name=name,
            verbose=0,
            storage_path=storage_root("ray_results"),  # $FEWSOUND_STORAGE on a cluster
            callbacks=[callback] if callback else None,
            stop=stopper,  # tune.spine.StopOnSignal: SIGINT/SIGTERM end every trial
        ),
    )
    return tuner.fit()


def _close_dead_trials(grid: Any, parent: MlflowRun) -> None:
    """A trial ASHA stopped closes its run itself (SystemExit); a trial whose worker died leaves it RUNNING."""
    for result in grid:
        m = result.metrics or {}
        run_id = m.get("mlflow_run_id")
        if run_id and (result.error is not None or m.get("final") != 1):
            if parent.client.get_run(run_id).info.status == "RUNNING":
                parent.client.set_terminated(run_id, status="FAILED" if result.error is not None else "KILLED")


def _check_search(spec: SearchSpec, trials: int, max_params: int | None) -> None:
    """Bad arguments fail here, before MLflow or Ray start."""
    families = list(spec.families)
    for family in families:
        if family not in KNOBS:
            raise ConfigError("--family", f"unknown family {family!r}; valid: any, {', '.join(KNOBS)}")
    objective_metrics(spec.objective, spec.weights)
    if trials < 1 or spec.chunks < 1 or spec.steps < spec.chunks:
        raise ConfigError("--trials/--chunks/--steps", "need trials >= 1, chunks >= 1 and steps >= chunks")
    if max_params is not None and min(smallest_params(f) for f in families) > max_params:
        smallest = min(smallest_params(f) for f in families)
        raise ConfigError(
            "--max-params",
            f"{max_params:,} is below the smallest configuration of the search space ({smallest:,} parameters)",
        )


def _open_search_parent(spec: SearchSpec, sid: str, trials: int, max_params: int | None) -> MlflowRun:
    """The search's parent run: reopened when the same search runs again (resume), else created."""
    families = list(spec.families)
    keyed = open_keyed_run(
        spec.experiment,
        SEARCH_TAG,
        sid,
        run_name=f"{sid}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={JOB_TAG: "search_inr", FAMILY_TAG: ",".join(families), TRIALS_TAG: trials},
    )
    parent = keyed.run
    if not keyed.created:
        parent.set_tags({TRIALS_TAG: trials})
        return parent
    parent.log_params(
        {
            "family": ",".join(families),
            "objective": spec.objective,
            "weights": json.dumps(spec.weights),
            "max_params": max_params,
            "steps": spec.steps,
            "chunks": spec.chunks,
            "clips": ",".join(spec.clips),
            "clip.length": spec.length,
            "seed": spec.seed,
        }
    )
    return parent


def _ended(parent: MlflowRun) -> Callable[[int], dict[str, Any] | None]:
    """Trial number -> how its run ended (tune.search.study.prepare_resume's `ended`), for runs that ran every step or
    that ASHA stopped: a driver killed in the moment between a trial's end and its result reaching the driver
    finds the trial here instead of refitting it."""
    runs = search_runs(parent.client, parent.experiment_id, children_filter(parent.run_id, not_status="RUNNING"))
    records: dict[int, dict[str, Any]] = {}
    for r in runs:
        number, m = r.data.tags.get(TRIAL_TAG), r.data.metrics
        if number is None:
            continue
        base = {"mlflow_run_id": r.info.run_id, "metrics": {k: v for k, v in m.items() if k.startswith("eval/")}}
        if r.info.status == "FINISHED" and "search/objective" in m and PER_CLIP_TAG in r.data.tags:
            records[int(number)] = {
                **base,
                "outcome": "finished",
                "value": m["search/objective"],
                "per_clip": r.data.tags[PER_CLIP_TAG],
                "steps": int(r.data.params.get("fit.steps", 0)),
            }
        elif r.info.status == "KILLED" and r.data.tags.get(STOPPED_TAG, "").startswith("ASHA"):
            records[int(number)] = {**base, "outcome": "stopped_early"}
    return records.get


def _mark_stale(parent: MlflowRun) -> None:
    """Child runs a killed driver left RUNNING: KILLED (their trials are refitted)."""
    why = {STOPPED_TAG: "interrupted (the driver was killed)"}
    mark_stale(parent.client, parent.experiment_id, children_filter(parent.run_id), tags=why)
