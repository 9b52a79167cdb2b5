"""Hyper-parameter search of one INR family: Optuna TPE (through Ray Tune's OptunaSearch) with ASHA early stopping.

    summary = run_search("kan", clip_ids, corpus=DIR, steps=2000, trials=200, objective="pesq", max_params=34_000)

- Search space (`SPACES`): define-by-run, per family: the learning rate, depth and widths, and the family's own
  knobs, including what the paper left unstated (FINER k / omega, WIRE omega0 / s0, RFF sigma).
- Parameter budget: a suggestion over `max_params` is never fitted and never becomes a Ray trial. The searcher
  counts its parameters on the driver (building the INR config costs microseconds), tells Optuna the trial is
  PRUNED with the constraint `params - max_params > 0` (TPE then ranks it below every feasible trial and learns
  to avoid that region), and asks again.
- A trial fits ONE configuration on a small pack of clips (the packed engine) for `steps`, and reports the
  objective (mean over the pack) after each of `chunks` equal chunks; ASHA stops poor trials at its rungs.
  The objective is read off the reconstruction the loss has just scored (fewsound.fit's `loss_fn` hook), so a
  chunk boundary costs one evaluation of the objective's metrics, no extra forward pass.
- MLflow: one parent run; each trial is a child run (params, the objective after every chunk as a curve, final
  metrics); a trial ASHA stopped ends KILLED with the step it reached. The paper's configuration is fitted on
  the same clips with the same steps (a baseline child run) and compared with the best trial.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from fewsound.errors import ConfigError
from fewsound.fit import FitConfig
from fewsound.search_space import (
    FINAL_METRICS,
    MODES,
    SPACES,
    count_params,
    objective_metrics,
    score,
    smallest_params,
    to_fit_config,
)
from fewsound.tracking import MlflowRun, tracking_uri
from tune.ray_env import capacity, fraction_text, init_ray, quiet_defaults, storage_root, trial_resources, trial_slots
from tune.sweep import ROLE_TAG

PARENT_ROLE = "search_parent"
MAX_REJECTS = 500  # consecutive over-budget suggestions before giving up


class BudgetedOptunaSearch(OptunaSearch):
    """OptunaSearch that never hands Tune a configuration over the parameter budget (see module docstring)."""

    def __init__(self, *args, family: str, max_params: int | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.family, self.max_params = family, max_params
        self.rejected: list[dict[str, Any]] = []

    def suggest(self, trial_id: str):
        for _ in range(MAX_REJECTS):
            params = super().suggest(trial_id)
            if params is None:
                return None
            n = count_params(self.family, params)
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr("num_params", n)
            if self.max_params is None:
                return params
            ot_trial.set_constraint("params_over_budget", n - self.max_params)
            if n <= self.max_params:
                return params
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            del self._ot_trials[trial_id]
            self.rejected.append(dict(params, num_params=n))
        raise ConfigError(
            "--max-params",
            f"{MAX_REJECTS} suggestions in a row were over {self.max_params:,} parameters; raise the budget",
        )


# --- the trial ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchContext:
    family: str
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

    @property
    def chunk_steps(self) -> int:
        return max(1, self.steps // self.chunks)


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


def _evaluate(ctx: SearchContext, clips: np.ndarray, recs: np.ndarray, metrics) -> tuple[float, dict[str, float]]:
    """(objective, per-metric means over the pack) of reconstructions [B, N]; a non-finite clip scores WORST."""
    from fewsound.metrics import evaluate

    ok = np.isfinite(recs).all(axis=1)
    rows = [{} for _ in range(len(recs))]
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
    return value, means


def fit_and_score(
    params: dict[str, Any],
    ctx: SearchContext,
    *,
    role: str,
    report: Callable | None = None,
    name: str | None = None,
    cfg: FitConfig | None = None,
) -> dict[str, Any]:
    """Fit one configuration on the context's clips; log a child run; report the objective after every chunk.

    cfg: the configuration (default: `to_fit_config(params)`). report: called with each intermediate result
    (ray.tune.report in a trial); ASHA may end the trial inside it, leaving the run RUNNING for the driver to close.
    Returns the final result.
    """
    from fewsound.config import flatten
    from fewsound.fit import fit
    from fewsound.metrics import to_mlflow
    from tune.trial import load_clip

    cfg = cfg or to_fit_config(ctx.family, params, ctx.steps, ctx.seed, log_every=ctx.chunk_steps)
    run = MlflowRun(
        ctx.experiment,
        uri=ctx.tracking_uri,
        run_name=name,
        parent_run_id=ctx.parent_run_id,
        tags={"fewsound.role": role, "fewsound.family": ctx.family, "fewsound.label": name or role},
    )
    n_params = cfg.build_inr().num_params()
    run.log_params(
        {
            **{f"search.{k}": v for k, v in params.items()},
            **{f"fit.{k}": v for k, v in flatten(cfg).items()},
            "fit.lr_resolved": cfg.resolved_lr,
            "clips": ",".join(ctx.clips),
            "clip.length": ctx.length,
            "clip.kind": ctx.kind,
            "objective": ctx.objective,
            "family": ctx.family,
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
            value, means = _evaluate(ctx, clips, watch.pred.cpu().numpy(), metrics)
            run.log_metrics({"search/objective": value, "fit/loss": logged["fit/loss"]}, step=done)
            reached[0] = done
            if report is not None:
                report({**base, "objective": value, "steps": done})

    t0 = time.perf_counter()
    try:
        results = fit(cfg, clips, logger=ChunkLogger(), loss_fn=watch)
        recs = np.stack([r.reconstruction for r in results])
        value, means = _evaluate(ctx, clips, recs, dict.fromkeys([*metrics, *ctx.final_metrics]))
        final = {
            "search/objective": value,
            **to_mlflow(means),
            "model/params": n_params,
            "fit/loss": float(np.mean([r.loss for r in results])),
            "cost/seconds": time.perf_counter() - t0,
            "fit/diverged": float(sum(r.diverged for r in results)),
        }
        run.log_metrics(final, step=cfg.steps)
    except SystemExit:  # how Tune ends a trial its scheduler stopped: inside report(), in the trial's thread
        run.set_tags({"fewsound.stopped_early": f"ASHA at step {reached[0]}"})
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
    out = {**base, **final, "objective": value, "steps": cfg.steps, "final": 1}
    if report is not None:
        report(out)
    return out


def search_trainable(config: dict[str, Any], ctx: SearchContext) -> None:
    """Ray Tune function trainable: one configuration on the context's pack of clips."""
    import torch

    torch.set_num_threads(1)
    os.environ["MLFLOW_TRACKING_URI"] = ctx.tracking_uri
    trial_id = tune.get_context().get_trial_id()
    fit_and_score(config, ctx, role="trial", report=tune.report, name=f"trial-{trial_id}")


# --- the driver -----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchSummary:
    experiment: str
    parent_run_id: str
    tracking_uri: str
    mode: str
    trials: int  # fitted (Ray trials)
    finished: int  # ran every step
    stopped_early: int  # stopped by ASHA
    failed: int
    rejected: list[dict[str, Any]]  # suggestions over the parameter budget (never fitted)
    best: dict[str, Any] | None  # the best finished trial: params, objective, metrics, run id
    baseline: dict[str, Any]  # the paper's configuration on the same clips, same steps
    comparison_markdown: str
    seconds: float

    @property
    def ui_url(self) -> str:
        return f"{self.tracking_uri}/#/experiments"


def run_search(
    ctx_args: dict[str, Any],
    *,
    trials: int,
    max_params: int | None,
    grace_chunks: int = 1,
    reduction_factor: int = 2,
    concurrency: int | None = None,
    address: str | None = None,
    gpu_fraction: float = 0.25,
    progress: bool = True,
) -> SearchSummary:
    """Run the search described by `ctx_args` (SearchContext fields except parent_run_id / tracking_uri).

    concurrency: most trials at once (None: as many as the cluster runs at its capacity, tune.ray_env)."""
    _check_search(ctx_args, trials, max_params)
    family, objective = ctx_args["family"], ctx_args["objective"]
    mode = MODES[objective]
    quiet_defaults()
    t0 = time.perf_counter()
    parent = _open_search_parent(ctx_args, trials, max_params)
    ctx = SearchContext(**ctx_args, parent_run_id=parent.run_id, tracking_uri=parent.uri)
    cap = capacity(init_ray(address))
    resources = trial_resources(cap, gpu_fraction)
    if progress:
        slots = trial_slots(cap, resources, concurrency)
        print(
            f"[search_inr] planning for {cap.describe()}: {slots} trials at once of {fraction_text(resources)}"
            + (f"; capped by --concurrency {concurrency}" if concurrency else ""),
            flush=True,
        )
        print(
            f"[search_inr] {family}: {trials} trials of {ctx.steps} steps on {len(ctx.clips)} clips, objective "
            f"{objective} ({mode}), budget {max_params or 'none'}; MLflow {parent.uri} experiment {ctx.experiment!r}",
            flush=True,
        )

    # the paper's configuration on the same clips and steps, beside the search (one CPU / GPU share)
    paper_cfg = FitConfig(family=family, steps=ctx.steps, seed=ctx.seed, log_every=ctx.chunk_steps)
    baseline_ref = (
        ray.remote(_baseline_task)
        .options(num_cpus=resources["cpu"], num_gpus=resources.get("gpu", 0))
        .remote(paper_cfg, ctx)
    )
    searcher = BudgetedOptunaSearch(
        space=SPACES[family],
        metric="objective",
        mode=mode,
        family=family,
        max_params=max_params,
        sampler=optuna.samplers.TPESampler(seed=ctx.seed, n_startup_trials=min(10, max(2, trials // 5))),
    )
    scheduler = ASHAScheduler(
        time_attr="training_iteration", max_t=ctx.chunks, grace_period=grace_chunks, reduction_factor=reduction_factor
    )
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(search_trainable, ctx=ctx), resources),
        tune_config=tune.TuneConfig(
            metric="objective",
            mode=mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=trials,
            reuse_actors=True,
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(
            name=f"search-{family}-{parent.run_id[:8]}",
            verbose=0,
            storage_path=storage_root("ray_results"),  # $FEWSOUND_STORAGE on a cluster
            callbacks=[SearchProgress(trials, mode, t0)] if progress else None,
        ),
    )
    grid = tuner.fit()
    baseline = ray.get(baseline_ref)
    summary = _summarize_search(grid, parent, ctx, mode, searcher.rejected, baseline, t0)
    summary.comparison_markdown = comparison_markdown(summary, family, objective)
    _finish_parent(parent, summary, family, trials_table(grid))
    return summary


def _check_search(ctx_args: dict[str, Any], trials: int, max_params: int | None) -> None:
    """Bad arguments fail here, before MLflow or Ray start."""
    family, objective = ctx_args["family"], ctx_args["objective"]
    if family not in SPACES:
        raise ConfigError("--family", f"unknown family {family!r}; valid: {', '.join(SPACES)}")
    objective_metrics(objective, ctx_args["weights"])
    if trials < 1 or ctx_args["chunks"] < 1 or ctx_args["steps"] < ctx_args["chunks"]:
        raise ConfigError("--trials/--chunks/--steps", "need trials >= 1, chunks >= 1 and steps >= chunks")
    if max_params is not None and smallest_params(family) > max_params:
        raise ConfigError(
            "--max-params",
            f"{max_params:,} is below the smallest {family} configuration of the "
            f"search space ({smallest_params(family):,} parameters)",
        )


def _open_search_parent(ctx_args: dict[str, Any], trials: int, max_params: int | None) -> MlflowRun:
    family, objective = ctx_args["family"], ctx_args["objective"]
    name = f"search-{family}-{objective}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = MlflowRun(
        ctx_args["experiment"],
        uri=tracking_uri(),
        run_name=name,
        tags={ROLE_TAG: "parent", "fewsound.job": "search_inr", "fewsound.family": family},
    )
    parent.log_params(
        {
            "family": family,
            "objective": objective,
            "weights": json.dumps(ctx_args["weights"]),
            "trials": trials,
            "max_params": max_params,
            "steps": ctx_args["steps"],
            "chunks": ctx_args["chunks"],
            "clips": ",".join(ctx_args["clips"]),
            "clip.length": ctx_args["length"],
        }
    )
    return parent


def _summarize_search(
    grid: Any,
    parent: MlflowRun,
    ctx: SearchContext,
    mode: str,
    rejected: list[dict[str, Any]],
    baseline: dict[str, Any],
    t0: float,
) -> SearchSummary:
    """Sort the trials into finished / stopped early / failed (closing the runs a dead worker left open)."""
    finished, stopped, failed = [], [], 0
    for result in grid:
        m = result.metrics or {}
        run_id = m.get("mlflow_run_id")
        if result.error is not None:
            failed += 1
            if run_id:
                parent.client.set_terminated(run_id, status="FAILED")
        elif m.get("final") == 1:
            finished.append({"params": dict(result.config), **m})
        else:  # stopped by ASHA inside tune.report: its run is still RUNNING
            stopped.append(m)
            if run_id:  # the trial closes its run itself (SystemExit); this covers a worker that died first
                parent.client.set_tag(run_id, "fewsound.stopped_early", f"ASHA at step {m.get('steps')}")
                parent.client.set_terminated(run_id, status="KILLED")
    best = None
    if finished:
        best = (max if mode == "max" else min)(finished, key=lambda r: r["objective"])
    return SearchSummary(
        ctx.experiment,
        parent.run_id,
        parent.uri,
        mode,
        len(grid),
        len(finished),
        len(stopped),
        failed,
        rejected,
        best,
        baseline,
        "",
        time.perf_counter() - t0,
    )


def _baseline_task(cfg: FitConfig, ctx: SearchContext) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    return fit_and_score({}, ctx, role="baseline", name="paper-config", cfg=cfg)


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


def comparison_markdown(s: SearchSummary, family: str, objective: str) -> str:
    """Best trial vs the paper's configuration, same clips and steps, as a Markdown table."""

    def fmt(v):
        if v is None:
            return "-"
        return f"{int(v):,}" if float(v).is_integer() and abs(v) >= 100 else f"{v:.4g}"

    rows = [("paper config", s.baseline)] + ([("best trial", s.best)] if s.best else [])
    out = [
        f"### {family}: best of {s.trials} trials vs the paper's configuration (objective {objective}, {s.mode})",
        "",
        "| | " + " | ".join(c for c, _ in FIELDS) + " |",
        "|---|" + "---|" * len(FIELDS),
    ]
    for name, r in rows:
        out.append(f"| {name} | " + " | ".join(fmt(r.get(k)) for _, k in FIELDS) + " |")
    if s.best:
        out += ["", "best configuration: " + json.dumps(s.best["params"], sort_keys=True)]
    out.append(
        f"{s.finished} trials ran every step, {s.stopped_early} stopped early by ASHA, {s.failed} failed, "
        f"{len(s.rejected)} suggestions over the parameter budget never fitted"
    )
    return "\n".join(out)


def trials_table(grid) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        m = result.metrics or {}
        rows.append(
            {
                **{f"param.{k}": v for k, v in (result.config or {}).items()},
                **{k: m.get(k) for k in ("objective", "steps", "final", "num_params", "mlflow_run_id")},
                "error": None if result.error is None else str(result.error).splitlines()[-1][:200],
            }
        )
    return rows


def _finish_parent(parent, s: SearchSummary, family: str, trials: list[dict[str, Any]]) -> None:
    from fewsound.tables import rows_to_csv

    parent.log_metrics(
        {
            "search/trials": s.trials,
            "search/finished": s.finished,
            "search/stopped_early": s.stopped_early,
            "search/failed": s.failed,
            "search/rejected_over_budget": len(s.rejected),
            "search/seconds": s.seconds,
            "search/baseline_objective": s.baseline["objective"],
        }
    )
    if s.best:
        parent.log_metrics({"search/best_objective": s.best["objective"]})
        parent.log_params({f"best.{k}": v for k, v in s.best["params"].items()})
        parent.set_tags({"fewsound.best_run_id": s.best["mlflow_run_id"]})
    with tempfile.TemporaryDirectory() as d:
        files = {
            "comparison.md": s.comparison_markdown,
            "trials.csv": rows_to_csv(trials) if trials else "",
            "rejected_over_budget.csv": rows_to_csv(s.rejected) if s.rejected else "",
            "best_config.json": json.dumps(
                {
                    "family": family,
                    "params": s.best["params"] if s.best else None,
                    "objective": s.best["objective"] if s.best else None,
                },
                indent=2,
            ),
        }
        for name, text in files.items():
            (Path(d) / name).write_text(text)
            parent.log_artifact(Path(d) / name, "search")
    parent.end("FINISHED" if s.best else "FAILED")


class SearchProgress(tune.Callback):
    """One line per ended trial: done / stopped early / remaining / best so far / ETA."""

    def __init__(self, total: int, mode: str, t0: float):
        self.total, self.mode, self.t0 = total, mode, t0
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
        eta = (self.total - self.ended) * elapsed / self.ended
        print(
            f"[search_inr] trials done {self.ended}/{self.total}  stopped early {self.stopped}  remaining "
            f"{self.total - self.ended}  best {self.best if self.best is None else f'{self.best:.4g}'}  "
            f"ETA {eta:.0f} s",
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial)
