"""Hyper-parameter search of INR families under a parameter budget: an Optuna study (TPE) driven through Ray Tune,
with ASHA early stopping, that starts from the paper's configuration and survives a kill.

    summary = run_search(ctx_args, trials=200, max_params=34_000)   # ctx_args: SearchContext fields

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
  trial as CSV, the importances and plots (tune.search_report) and the listening page.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from fewsound import storage
from fewsound.config import cfg_hash
from fewsound.errors import ConfigError, Stopped
from fewsound.fit import FitConfig
from fewsound.search_space import (
    FINAL_METRICS,
    KNOBS,
    MODES,
    count_params,
    encode_point,
    objective_metrics,
    score,
    smallest_params,
    start_point,
    to_fit_config,
)
from fewsound.tracking import PARENT_TAG, MlflowRun, tracking_uri, ui_url
from tune.lease import take_lease
from tune.ray_env import (
    capacity,
    fraction_text,
    init_ray,
    quiet_defaults,
    quiet_exits,
    storage_root,
    trial_resources,
    trial_slots,
)
from tune.stopping import StopOnSignal
from tune.study import (
    NUMBER_KEY,
    START_KEY,
    StartPointsRunToEnd,
    StudySearcher,
    StudyStore,
    fitted_trials,
    prepare_resume,
)
from tune.sweep import ROLE_TAG

SEARCH_TAG = "fewsound.search"
TRIAL_TAG = "fewsound.optuna_trial"  # a trial's run: the number of its Optuna trial
PER_CLIP_TAG = "fewsound.per_clip"  # a finished trial's run: each clip's metrics (JSON)
STOPPED_TAG = "fewsound.stopped_early"  # a KILLED trial's run: why ("ASHA at step N", or interrupted)
PAPER = "paper"  # the name of a family's paper configuration among the start points ("paper" or "paper kan")


# --- the trial ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchContext:
    families: tuple[str, ...]
    corpus: str
    clips: tuple[str, ...]
    kind: str
    length: int
    steps: int
    chunks: int
    objective: str
    weights: dict[str, float]
    seed: int
    experiment: str
    parent_run_id: str
    tracking_uri: str
    final_metrics: tuple[str, ...] = FINAL_METRICS
    sample_rate: int = 22_050  # of the corpus's clips (the paper's protocol)
    log_audio: bool = True  # each clip's gt/pred audio and spectrogram on trials that ran every step

    @property
    def chunk_steps(self) -> int:
        return max(1, self.steps // self.chunks)

    @property
    def name(self) -> str:
        return "+".join(self.families) if len(self.families) < len(KNOBS) else "any"


class _Watch:
    """The paper's loss as fit()'s loss_fn, keeping the prediction it scored last (for the chunk objective)."""

    def __init__(self, cfg: FitConfig):
        self.cfg, self.loss, self.pred = cfg, None, None

    def __call__(self, pred, target):
        from fewsound.losses import ReconstructionLoss

        if self.loss is None:
            self.loss = ReconstructionLoss(
                target, lambda_t=self.cfg.lambda_t, lambda_f=self.cfg.lambda_f, sr=self.cfg.sample_rate
            )
        self.pred = pred.detach()
        return self.loss(pred)


def _evaluate(
    ctx: SearchContext, clips: np.ndarray, recs: np.ndarray, metrics
) -> tuple[float, dict[str, float], list[dict[str, Any]]]:
    """(objective, per-metric means over the pack, per-clip rows) of reconstructions [B, N]; a non-finite clip
    scores WORST."""
    from fewsound.metrics import evaluate

    ok = np.isfinite(recs).all(axis=1)
    rows: list[dict[str, Any]] = [{} for _ in range(len(recs))]
    if ok.any():
        for i, row in zip(
            np.flatnonzero(ok), evaluate(clips[ok], recs[ok], ctx.sample_rate, kind=ctx.kind, metrics=list(metrics))
        ):
            rows[i] = row
    value = float(np.mean([score(ctx.objective, ctx.weights, r) for r in rows]))
    means = {}
    for m in metrics:
        xs = [r[m] for r in rows if r.get(m) is not None and math.isfinite(r[m])]
        if xs:
            means[m] = float(np.mean(xs))
    return value, means, rows


def _log_audio(run: MlflowRun, ctx: SearchContext, clips: np.ndarray, recs: np.ndarray) -> None:
    """audio/<clip>/gt.wav, audio/<clip>/pred.wav and plots/<clip>/spectrogram.png, as a sweep's fits log them."""
    from fewsound.data.audio import save_audio
    from fewsound.report import save_spectrogram_png

    with tempfile.TemporaryDirectory() as d:
        for clip_id, ref, pred in zip(ctx.clips, clips, recs):
            save_audio(Path(d) / "audio" / clip_id / "gt.wav", ref, ctx.sample_rate)
            save_audio(Path(d) / "audio" / clip_id / "pred.wav", pred, ctx.sample_rate)
            save_spectrogram_png(Path(d) / "plots" / clip_id / "spectrogram.png", ref, pred, ctx.sample_rate, clip_id)
        run.log_artifact(d)


def fit_and_score(params: dict[str, Any], ctx: SearchContext, *, report: Callable | None = None) -> dict[str, Any]:
    """Fit one point (fewsound.search_space: family, knobs, widths) on the context's clips; log a child run;
    report the objective after every chunk. report: called with each intermediate result (ray.tune.report in a
    trial); ASHA may end the trial inside it. Returns the final result."""
    from fewsound.config import flatten
    from fewsound.fit import fit
    from fewsound.metrics import to_mlflow
    from tune.trial import load_clip

    family, start = params["family"], params.get(START_KEY)
    point = {k: v for k, v in params.items() if k not in (START_KEY, NUMBER_KEY)}
    cfg = to_fit_config(family, point, ctx.steps, ctx.seed, log_every=ctx.chunk_steps)
    label = start_label(start, ctx.families) if start else None
    run = MlflowRun(
        ctx.experiment,
        uri=ctx.tracking_uri,
        run_name=label or (f"trial-{tune.get_context().get_trial_id()}" if report else None),
        parent_run_id=ctx.parent_run_id,
        tags={
            ROLE_TAG: "start_point" if start else "trial",
            "fewsound.family": family,
            "fewsound.label": label or "trial",
            **({"fewsound.start_point": start} if start else {}),
            **({TRIAL_TAG: params[NUMBER_KEY]} if NUMBER_KEY in params else {}),
        },
    )
    n_params = cfg.build_inr().num_params()
    run.log_params(
        {
            **{f"search.{k}": v for k, v in point.items()},
            **{f"fit.{k}": v for k, v in flatten(cfg).items()},
            "fit.lr_resolved": cfg.resolved_lr,
            "clips": ",".join(ctx.clips),
            "clip.length": ctx.length,
            "clip.kind": ctx.kind,
            "objective": ctx.objective,
            "family": family,
        }
    )
    run.log_metrics({"model/params": n_params})
    clips = np.stack([load_clip(ctx.corpus, c, ctx.length) for c in ctx.clips])
    watch = _Watch(cfg)
    metrics = objective_metrics(ctx.objective, ctx.weights)
    base = {"mlflow_run_id": run.run_id, "num_params": n_params, "final": 0}
    reached = [0]  # the last step reported

    class ChunkLogger:
        def log_metrics(self, logged: dict[str, float], step: int) -> None:
            done = step + 1
            if done >= cfg.steps or watch.pred is None:
                return  # the last chunk is reported once, with the final metrics
            value, _, _ = _evaluate(ctx, clips, watch.pred.cpu().numpy(), metrics)
            run.log_metrics({"search/objective": value, "fit/loss": logged["fit/loss"]}, step=done)
            reached[0] = done
            if report is not None:
                report({**base, "objective": value, "steps": done})

    t0 = time.perf_counter()
    try:
        results = fit(cfg, clips, logger=ChunkLogger(), loss_fn=watch)
        recs = np.stack([r.reconstruction for r in results])
        value, means, rows = _evaluate(ctx, clips, recs, dict.fromkeys([*metrics, *ctx.final_metrics]))
        final = {
            "search/objective": value,
            **to_mlflow(means),
            "model/params": n_params,
            "fit/loss": float(np.mean([r.loss for r in results])),
            "cost/seconds": time.perf_counter() - t0,
            "fit/diverged": float(sum(r.diverged for r in results)),
        }
        run.log_metrics(final, step=cfg.steps)
        per_clip = json.dumps(
            {c: to_mlflow({k: v for k, v in r.items() if isinstance(v, float)}) for c, r in zip(ctx.clips, rows)}
        )
        run.set_tags({PER_CLIP_TAG: per_clip})  # with the metrics: what a resumed driver recovers the trial from
        if ctx.log_audio:
            _log_audio(run, ctx, clips, recs)
    except SystemExit:  # how Tune ends a trial its scheduler stopped: inside report(), in the trial's thread
        run.set_tags({STOPPED_TAG: f"ASHA at step {reached[0]}"})
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
    out = {**base, **final, "objective": value, "steps": cfg.steps, "final": 1, "per_clip": per_clip}
    if report is not None:
        report(out)
    return out


def search_trainable(config: dict[str, Any], ctx: SearchContext) -> None:
    """Ray Tune function trainable: one configuration on the context's pack of clips."""
    import ray
    import torch

    from fewsound.device import claim_gpu_share
    from tune.ray_env import cpu_means_cpu

    cpu_means_cpu()  # before anything asks torch about CUDA: a trial given no GPU runs on the CPU
    quiet_exits()  # Ray's SIGTERM to a finished actor: no "Exception ignored ... SystemExit" in the output
    torch.set_num_threads(1)
    claim_gpu_share(ray.get_runtime_context().get_assigned_resources().get("GPU"))  # capped at its share
    os.environ["MLFLOW_TRACKING_URI"] = ctx.tracking_uri
    fit_and_score(config, ctx, report=tune.report)


def start_label(name: str, families: tuple[str, ...] | list[str]) -> str:
    """How a start point is shown: "paper config" (one family) / "paper kan"; a user's point as named."""
    if name.startswith(PAPER):
        return "paper config" if len(families) == 1 else name
    return name


# --- the driver -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchSummary:
    experiment: str
    parent_run_id: str
    tracking_uri: str
    mode: str
    trials: int  # fitted trials of the study (this run and the runs it resumed)
    finished: int  # ran every step
    stopped_early: int  # stopped by ASHA
    failed: int
    rejected: int  # suggestions over the parameter budget (never fitted)
    resumed: int  # trials that had ended before this run
    best: dict[str, Any] | None  # the best trial that ran every step (start points included)
    starts: list[dict[str, Any]]  # the start points that ran every step (the paper's configuration first)
    comparison_markdown: str
    seconds: float
    artifacts: list[str] = dataclasses.field(default_factory=list)  # what the parent run got
    importances: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # evaluator -> param -> share

    experiment_id: str | None = None

    @property
    def ui_url(self) -> str:
        """The search's experiment in MLflow's UI, opened on its runs."""
        return ui_url(self.tracking_uri, self.experiment_id)

    @property
    def paper_stays_best(self) -> bool:
        return bool(self.best and str(self.best.get(START_KEY) or "").startswith(PAPER))


def search_id(ctx_args: dict[str, Any], max_params: int | None, points: list[tuple[str, dict[str, Any]]]) -> str:
    """What defines a search (so that the same command finds its study again): not the number of trials."""
    what = {k: ctx_args[k] for k in ("families", "clips", "kind", "length", "steps", "chunks", "objective", "seed")}
    what.update(corpus=storage.name(str(ctx_args["corpus"])), weights=ctx_args["weights"], max_params=max_params)
    what["start_points"] = points
    name = "+".join(ctx_args["families"]) if len(ctx_args["families"]) < len(KNOBS) else "any"
    return f"search-{name}-{ctx_args['objective']}-{cfg_hash(what)}"


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
    ctx_args: dict[str, Any],
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
) -> SearchSummary:
    """Run (or resume) the search described by `ctx_args` (SearchContext fields except parent_run_id /
    tracking_uri). concurrency: most trials at once (None: as many as the cluster runs, tune.ray_env)."""
    _check_search(ctx_args, trials, max_params)
    families = list(ctx_args["families"])
    points = start_points(families, start_from or [])
    mode = MODES[ctx_args["objective"]]
    quiet_defaults()
    t0 = time.perf_counter()
    sid = search_id(ctx_args, max_params, points)
    store = StudyStore(sid)
    study = store.open(sid, mode, ctx_args["seed"], n_startup=min(10, max(2, trials // 5)))
    lease = take_lease(tracking_uri(), ctx_args["experiment"], sid)  # a second driver of this search is refused
    parent = _open_search_parent(ctx_args, sid, trials, max_params)
    ctx = SearchContext(**ctx_args, parent_run_id=parent.run_id, tracking_uri=parent.uri)
    fitting = _fitting_start_points(points, max_params)
    interrupted = prepare_resume(study, fitting, lambda p: encode_point(p, families, max_params), _ended(parent))
    _mark_stale(parent)
    store.sync()
    done_before = len(fitted_trials(study))
    todo = max(0, trials - done_before)
    if progress:
        print(
            f"[search_inr] {ctx.name}: {trials} trials of {ctx.steps} steps on {len(ctx.clips)} clips, objective "
            f"{ctx.objective} ({mode}), budget {max_params or 'none'}; starts from {', '.join(n for n, _ in fitting)}"
            f"; study {store.uri}"
            + (f" ({done_before} trials already ended, {todo} to run)" if done_before or interrupted else "")
            + (f"; {interrupted} trials in flight when it stopped are refitted" if interrupted else "")
            + f"; MLflow {parent.uri} experiment {ctx.experiment!r}",
            flush=True,
        )
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
            store.sync()
            lease.release()
            parent.end("KILLED")
            ended = len(fitted_trials(study))
            raise Stopped(
                stop.signal,
                f"{ended} of {trials} trials ended ({ended - done_before} in this run); re-run the same command to "
                f"continue the same study ({store.uri}): ended trials are not refitted",
            )
    store.sync()
    summary = summarize_study(study, parent, ctx, mode, done_before, t0)
    summary.experiment_id = parent.experiment_id
    from tune.search_report import finish_parent

    finish_parent(parent, study, summary, ctx, max_params, listen_clips)
    lease.release()
    return summary


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
            stop=stopper,  # tune.stopping: SIGINT/SIGTERM end every trial
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


def _check_search(ctx_args: dict[str, Any], trials: int, max_params: int | None) -> None:
    """Bad arguments fail here, before MLflow or Ray start."""
    families = list(ctx_args["families"])
    for family in families:
        if family not in KNOBS:
            raise ConfigError("--family", f"unknown family {family!r}; valid: any, {', '.join(KNOBS)}")
    objective_metrics(ctx_args["objective"], ctx_args["weights"])
    if trials < 1 or ctx_args["chunks"] < 1 or ctx_args["steps"] < ctx_args["chunks"]:
        raise ConfigError("--trials/--chunks/--steps", "need trials >= 1, chunks >= 1 and steps >= chunks")
    if max_params is not None and min(smallest_params(f) for f in families) > max_params:
        smallest = min(smallest_params(f) for f in families)
        raise ConfigError(
            "--max-params",
            f"{max_params:,} is below the smallest configuration of the search space ({smallest:,} parameters)",
        )


def _open_search_parent(ctx_args: dict[str, Any], sid: str, trials: int, max_params: int | None) -> MlflowRun:
    """The search's parent run: reopened when the same search runs again (resume), else created."""
    from mlflow.tracking import MlflowClient

    from fewsound.tracking import get_or_create_experiment

    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    exp_id = get_or_create_experiment(client, ctx_args["experiment"])
    found = client.search_runs([exp_id], f"tags.`{SEARCH_TAG}` = '{sid}' and tags.`{ROLE_TAG}` = 'parent'")
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        parent = MlflowRun(ctx_args["experiment"], uri=uri, run_id=found[0].info.run_id)
        parent.set_tags({"fewsound.trials": trials})
        return parent
    families = list(ctx_args["families"])
    parent = MlflowRun(
        ctx_args["experiment"],
        uri=uri,
        run_name=f"{sid}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={
            ROLE_TAG: "parent",
            SEARCH_TAG: sid,
            "fewsound.job": "search_inr",
            "fewsound.family": ",".join(families),
            "fewsound.command": " ".join(sys.argv),
            "fewsound.trials": trials,
        },
    )
    parent.log_params(
        {
            "family": ",".join(families),
            "objective": ctx_args["objective"],
            "weights": json.dumps(ctx_args["weights"]),
            "max_params": max_params,
            "steps": ctx_args["steps"],
            "chunks": ctx_args["chunks"],
            "clips": ",".join(ctx_args["clips"]),
            "clip.length": ctx_args["length"],
            "seed": ctx_args["seed"],
        }
    )
    return parent


def _ended(parent: MlflowRun) -> Callable[[int], dict[str, Any] | None]:
    """Trial number -> how its run ended (tune.study.prepare_resume's `ended`), for runs that ran every step or
    that ASHA stopped: a driver killed in the moment between a trial's end and its result reaching the driver
    finds the trial here instead of refitting it."""
    runs = parent.client.search_runs(
        [parent.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.run_id}' and attributes.status != 'RUNNING'"
    )
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
    runs = parent.client.search_runs(
        [parent.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.run_id}' and attributes.status = 'RUNNING'"
    )
    for r in runs:
        parent.client.set_tag(r.info.run_id, STOPPED_TAG, "interrupted (the driver was killed)")
        parent.client.set_terminated(r.info.run_id, status="KILLED")


def trial_row(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """One fitted trial of the study: its point, outcome, objective, metrics, parameter count and run."""
    point = json.loads(t.user_attrs.get("point", "{}"))
    return {
        "number": t.number,
        "params": point,
        "family": point.get("family"),
        START_KEY: t.user_attrs.get(START_KEY),
        "outcome": t.user_attrs.get("outcome"),
        "objective": t.value if t.state == TrialState.COMPLETE else _last_value(t),
        "num_params": t.user_attrs.get("num_params"),
        "steps": t.user_attrs.get("steps"),
        "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
        "per_clip": json.loads(t.user_attrs.get("per_clip") or "{}"),
        **t.user_attrs.get("metrics", {}),
    }


def _last_value(t: optuna.trial.FrozenTrial) -> float | None:
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None


def summarize_study(
    study: optuna.Study, parent: MlflowRun, ctx: SearchContext, mode: str, resumed: int, t0: float
) -> SearchSummary:
    """The search's outcome from the whole study (every run of it): the best trial that ran every step, start
    points included, and the start points themselves."""
    rows = [trial_row(t) for t in fitted_trials(study)]
    finished = [r for r in rows if r["outcome"] == "finished"]
    best = (max if mode == "max" else min)(finished, key=lambda r: r["objective"]) if finished else None
    starts = sorted(
        (r for r in finished if r[START_KEY]), key=lambda r: (not r[START_KEY].startswith(PAPER), r["number"])
    )
    rejected = sum(t.user_attrs.get("outcome") == "rejected" for t in study.get_trials(deepcopy=False))
    s = SearchSummary(
        ctx.experiment,
        parent.run_id,
        parent.uri,
        mode,
        len(rows),
        len(finished),
        sum(r["outcome"] == "stopped_early" for r in rows),
        sum(r["outcome"] == "failed" for r in rows),
        rejected,
        resumed,
        best,
        starts,
        "",
        time.perf_counter() - t0,
    )
    s.comparison_markdown = comparison_markdown(s, ctx)
    return s


FIELDS = [
    ("objective", "objective"),
    ("# params", "num_params"),
    ("PSNR", "eval/psnr"),
    ("LSD", "eval/lsd"),
    ("SI-SNR", "eval/si_snr"),
    ("PESQ", "eval/pesq"),
    ("STOI", "eval/stoi"),
    ("MSE", "eval/mse"),
]


def comparison_markdown(s: SearchSummary, ctx: SearchContext) -> str:
    """The best trial vs the start points (same clips and steps) as a Markdown table, and whether the paper's
    configuration stayed best."""

    def fmt(v):
        if v is None:
            return "-"
        return f"{int(v):,}" if float(v).is_integer() and abs(v) >= 100 else f"{v:.4g}"

    rows = [(start_label(r[START_KEY], ctx.families), r) for r in s.starts]
    if s.best and not s.best[START_KEY]:
        rows.append(("best trial", s.best))
    out = [
        f"### {ctx.name}: best of {s.trials} trials vs the start points (objective {ctx.objective}, {s.mode})",
        "",
        "| | family | " + " | ".join(c for c, _ in FIELDS) + " |",
        "|---|---|" + "---|" * len(FIELDS),
    ]
    for name, r in rows:
        out.append(f"| {name} | {r['family']} | " + " | ".join(fmt(r.get(k)) for _, k in FIELDS) + " |")
    out.append("")
    if s.best and s.best[START_KEY]:
        who = start_label(s.best[START_KEY], ctx.families)
        out.append(f"**the start point {who!r} stays best**: no trial of the search beat it")
    elif s.best:
        out.append(f"best trial: #{s.best['number']} ({s.best['family']}, {s.best['num_params']:,} parameters)")
    if s.best:
        out.append("best configuration: " + json.dumps(s.best["params"], sort_keys=True))
    out.append(
        f"{s.finished} trials ran every step, {s.stopped_early} stopped early by ASHA, {s.failed} failed, "
        f"{s.rejected} suggestions over the parameter budget never fitted"
        + (f"; {s.resumed} trials came from an earlier run of this search" if s.resumed else "")
    )
    return "\n".join(out)


class SearchProgress(tune.Callback):
    """One line per ended trial: done / stopped early / remaining / best so far / ETA."""

    def __init__(self, total: int, before: int, mode: str, t0: float):
        self.total, self.before, self.mode, self.t0 = total, before, mode, t0
        self.ended = self.stopped = 0
        self.best = None

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended += 1
        r = trial.last_result or {}
        if r.get("final") != 1:
            self.stopped += 1
        elif self.best is None or (r["objective"] > self.best if self.mode == "max" else r["objective"] < self.best):
            self.best = r["objective"]
        elapsed = time.perf_counter() - self.t0
        done = self.before + self.ended
        eta = (self.total - done) * elapsed / self.ended
        print(
            f"[search_inr] trials done {done}/{self.total}  stopped early {self.stopped}  remaining "
            f"{self.total - done}  best now {self.best if self.best is None else f'{self.best:.4g}'}  "
            f"ETA {eta:.0f} s",
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial)
