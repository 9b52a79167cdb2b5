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

from fewsound.errors import ConfigError
from fewsound.fit import FitConfig

# Objective = mean over the pack of a per-clip score. Every metric is also put on a common "higher is better,
# about 0..1" scale for the weighted mix: PESQ 1..4.5, PSNR 0..50 dB, SI-SNR 0..30 dB, LSD 4..0.
NORMALIZE: dict[str, Callable[[float], float]] = {
    "pesq": lambda v: (v - 1.0) / 3.5,
    "psnr": lambda v: v / 50.0,
    "si_snr": lambda v: v / 30.0,
    "lsd": lambda v: 1.0 - v / 4.0,
}
MODES = {"pesq": "max", "psnr": "max", "si_snr": "max", "lsd": "min", "mix": "max"}
WORST = {"pesq": 1.0, "psnr": 0.0, "si_snr": -30.0, "lsd": 10.0}  # a metric that does not apply to a clip
DEFAULT_MIX = {"pesq": 0.5, "lsd": 0.25, "si_snr": 0.25}
FINAL_METRICS = ("mse", "psnr", "lsd", "si_snr", "pesq", "stoi")
PARENT_ROLE = "search_parent"
MAX_REJECTS = 500  # consecutive over-budget suggestions before giving up


def parse_weights(text: str | None) -> dict[str, float]:
    """'pesq=0.5,lsd=0.25' -> {"pesq": 0.5, "lsd": 0.25} (ConfigError on unknown names or bad numbers)."""
    if not text:
        return dict(DEFAULT_MIX)
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        try:
            w = float(value)
        except ValueError:
            raise ConfigError("--mix-weights", f"{item!r} is not name=weight") from None
        if name not in NORMALIZE or not math.isfinite(w) or w < 0:
            raise ConfigError("--mix-weights", f"{item!r}: names are {', '.join(NORMALIZE)}, weights >= 0")
        out[name] = w
    if not sum(out.values()) > 0:
        raise ConfigError("--mix-weights", "at least one weight must be positive")
    return out


def objective_metrics(objective: str, weights: dict[str, float]) -> list[str]:
    if objective not in MODES:
        raise ConfigError("--objective", f"unknown objective {objective!r}; valid: {', '.join(MODES)}")
    return [m for m, w in weights.items() if w > 0] if objective == "mix" else [objective]


def score(objective: str, weights: dict[str, float], row: dict[str, Any]) -> float:
    """One clip's objective from its evaluate() row (a metric that does not apply counts as WORST)."""

    def value(m: str) -> float:
        v = row.get(m)
        return float(v) if v is not None and math.isfinite(v) else WORST[m]

    if objective == "mix":
        return sum(w * NORMALIZE[m](value(m)) for m, w in weights.items()) / sum(weights.values())
    return value(objective)


# --- search spaces (define-by-run: depth decides how many widths exist) ----------------------------------------


def _widths(trial: Any, depth: tuple[int, int], width: tuple[int, int]) -> None:
    n = trial.suggest_int("depth", *depth)
    for i in range(n):
        trial.suggest_int(f"width{i}", *width, log=True)


def _kan(t):
    t.suggest_float("lr", 1e-3, 3e-2, log=True)
    t.suggest_int("encoding_length", 2, 16)
    t.suggest_int("grid_size", 1, 20)
    t.suggest_int("spline_order", 1, 5)
    t.suggest_categorical("enable_scale_spline", [True, False])
    _widths(t, (2, 4), (4, 96))


def _nerf(t):
    t.suggest_float("lr", 1e-4, 1e-2, log=True)
    t.suggest_int("encoding_length", 4, 16)
    _widths(t, (2, 6), (16, 192))


def _siren(t):
    t.suggest_float("lr", 1e-5, 1e-3, log=True)
    t.suggest_float("omega_0", 100.0, 5000.0, log=True)
    t.suggest_float("omega_i", 5.0, 60.0, log=True)
    _widths(t, (2, 6), (16, 192))


def _finer(t):
    _siren(t)
    t.suggest_float("first_bias_scale", 0.01, 20.0, log=True)  # FINER's k


def _wire(t):
    t.suggest_float("lr", 1e-4, 1e-2, log=True)
    t.suggest_float("omega_0", 100.0, 5000.0, log=True)
    # a hidden Gabor unit's magnitude can reach exp(omega_i^2 / (4 s0^2)): s0 above ~1 zeroes the units and
    # omega_i above ~2 s0 explodes them (fewsound/inr/wire.py), so the space centres on the defaults 1 / 0.5
    t.suggest_float("omega_i", 0.25, 4.0, log=True)
    t.suggest_float("s0", 0.1, 2.0, log=True)
    _widths(t, (2, 6), (16, 192))


def _rff(t):
    t.suggest_float("lr", 1e-4, 1e-2, log=True)
    t.suggest_float("sigma", 10.0, 5000.0, log=True)
    t.suggest_int("num_frequencies", 16, 128, log=True)
    _widths(t, (2, 6), (16, 192))


SPACES: dict[str, Callable[[Any], None]] = {
    "kan": _kan,
    "nerf": _nerf,
    "siren": _siren,
    "finer": _finer,
    "wire": _wire,
    "rff": _rff,
}


def to_fit_config(family: str, params: dict[str, Any], steps: int, seed: int = 0, **fit: Any) -> FitConfig:
    """A suggestion (flat Optuna params) -> the FitConfig it stands for."""
    from fewsound.inr import FAMILIES

    fields = {f.name for f in dataclasses.fields(FAMILIES[family].Config)}
    inr = {k: v for k, v in params.items() if k in fields}
    if "depth" in params:
        inr["widths"] = tuple(int(params[f"width{i}"]) for i in range(int(params["depth"])))
    return FitConfig(family=family, inr=inr, lr=params.get("lr"), steps=steps, seed=seed, **fit)


def count_params(family: str, params: dict[str, Any]) -> int:
    return to_fit_config(family, params, 1).build_inr().num_params()


class _Smallest:
    """A stand-in Optuna trial answering every suggestion with its smallest value (the last choice of a
    categorical, listed largest first): the space's smallest configuration, to check a budget up front."""

    def __init__(self):
        self.params: dict[str, Any] = {}

    def suggest_int(self, name, low, high, **_):
        return self.params.setdefault(name, low)

    def suggest_float(self, name, low, high, **_):
        return self.params.setdefault(name, low)

    def suggest_categorical(self, name, choices):
        return self.params.setdefault(name, choices[-1])


def smallest_params(family: str) -> int:
    trial = _Smallest()
    SPACES[family](trial)
    return count_params(family, trial.params)


def _budgeted_searcher_class():
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

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

    return BudgetedOptunaSearch


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
    from fewsound.tracking import MlflowRun
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
    import ray.tune
    import torch

    torch.set_num_threads(1)
    os.environ["MLFLOW_TRACKING_URI"] = ctx.tracking_uri
    trial_id = ray.tune.get_context().get_trial_id()
    fit_and_score(config, ctx, role="trial", report=ray.tune.report, name=f"trial-{trial_id}")


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
    """Run the search described by `ctx_args` (SearchContext fields except parent_run_id / tracking_uri)."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from fewsound.tracking import MlflowRun, tracking_uri
    from tune.sweep import ROLE_TAG, init_ray, quiet_defaults, trial_resources

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
    mode = MODES[objective]
    quiet_defaults()
    t0 = time.perf_counter()
    uri = tracking_uri()
    name = f"search-{family}-{objective}-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = MlflowRun(
        ctx_args["experiment"],
        uri=uri,
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
    ctx = SearchContext(**ctx_args, parent_run_id=parent.run_id, tracking_uri=uri)
    resources = trial_resources(init_ray(address), gpu_fraction)
    if progress:
        print(
            f"[search_inr] {family}: {trials} trials of {ctx.steps} steps on {len(ctx.clips)} clips, objective "
            f"{objective} ({mode}), budget {max_params or 'none'}; MLflow {uri} experiment {ctx.experiment!r}",
            flush=True,
        )

    # the paper's configuration on the same clips and steps, beside the search (one CPU / GPU share)
    paper_cfg = FitConfig(family=family, steps=ctx.steps, seed=ctx.seed, log_every=ctx.chunk_steps)
    baseline_ref = (
        ray.remote(_baseline_task)
        .options(num_cpus=resources["cpu"], num_gpus=resources.get("gpu", 0))
        .remote(paper_cfg, ctx)
    )

    searcher = _budgeted_searcher_class()(
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
    callback = _progress_callback(trials, mode, t0) if progress else None
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
            storage_path=str(Path(os.environ.get("FEWSOUND_HOME", Path.home() / ".fewsound")) / "ray_results"),
            callbacks=[callback] if callback else None,
        ),
    )
    grid = tuner.fit()
    baseline = ray.get(baseline_ref)

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
    summary = SearchSummary(
        ctx.experiment,
        parent.run_id,
        uri,
        mode,
        len(grid),
        len(finished),
        len(stopped),
        failed,
        searcher.rejected,
        best,
        baseline,
        "",
        time.perf_counter() - t0,
    )
    summary.comparison_markdown = comparison_markdown(summary, family, objective)
    _finish_parent(parent, summary, family, trials_table(grid))
    return summary


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


def _progress_callback(total: int, mode: str, t0: float):
    from ray.tune import Callback

    class Progress(Callback):
        """One line per ended trial: done / stopped early / remaining / best so far / ETA."""

        def __init__(self):
            self.ended = self.stopped = 0
            self.best = None

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended += 1
            r = trial.last_result or {}
            if r.get("final") != 1:
                self.stopped += 1
            elif self.best is None or (r["objective"] > self.best if mode == "max" else r["objective"] < self.best):
                self.best = r["objective"]
            elapsed = time.perf_counter() - t0
            eta = (total - self.ended) * elapsed / self.ended
            print(
                f"[search_inr] trials done {self.ended}/{total}  stopped early {self.stopped}  remaining "
                f"{total - self.ended}  best {self.best if self.best is None else f'{self.best:.4g}'}  "
                f"ETA {eta:.0f} s",
                flush=True,
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            self.on_trial_complete(iteration, trials, trial)

    return Progress()
