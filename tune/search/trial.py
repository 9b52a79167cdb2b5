"""One search trial: a configuration fitted on the search's pack of clips, scored after every chunk (ASHA stops
poor trials at its rungs), logged as a child run of the search's parent."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from ray import tune

from fewsound.fit import FitConfig
from fewsound.search_space import (
    objective_metrics,
    score,
    to_fit_config,
)
from fewsound.tracking import MlflowRun
from tune.ray_env import (
    quiet_exits,
)
from tune.search.results import SearchContext, start_label
from tune.search.study import (
    NUMBER_KEY,
    START_KEY,
)
from tune.spine import (
    FAMILY_TAG,
    LABEL_TAG,
    PER_CLIP_TAG,
    ROLE_TAG,
    START_POINT_TAG,
    STOPPED_TAG,
    TRIAL_TAG,
)


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
    from fewsound.fit import fit
    from fewsound.metrics import to_mlflow
    from tune.sweep.context import load_clip

    cfg = to_fit_config(params["family"], _point(params), ctx.steps, ctx.seed, log_every=ctx.chunk_steps)
    run = _trial_run(params, cfg, ctx, reporting=report is not None)
    n_params = cfg.build_inr().num_params()
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


def _point(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's configuration: its params less the study's bookkeeping (start-point name, trial number)."""
    return {k: v for k, v in params.items() if k not in (START_KEY, NUMBER_KEY)}


def _trial_run(params: dict[str, Any], cfg: Any, ctx: SearchContext, *, reporting: bool) -> MlflowRun:
    """The trial's child run of the search's parent, tagged (role, family, label, start point, Optuna trial) and
    with its params (the point, the fit config, the clips and the objective)."""
    from fewsound.config import flatten

    family, start = params["family"], params.get(START_KEY)
    label = start_label(start, ctx.families) if start else None
    run = MlflowRun(
        ctx.experiment,
        uri=ctx.tracking_uri,
        run_name=label or (f"trial-{tune.get_context().get_trial_id()}" if reporting else None),
        parent_run_id=ctx.parent_run_id,
        tags={
            ROLE_TAG: "start_point" if start else "trial",
            FAMILY_TAG: family,
            LABEL_TAG: label or "trial",
            **({START_POINT_TAG: start} if start else {}),
            **({TRIAL_TAG: params[NUMBER_KEY]} if NUMBER_KEY in params else {}),
        },
    )
    run.log_params(
        {
            **{f"search.{k}": v for k, v in _point(params).items()},
            **{f"fit.{k}": v for k, v in flatten(cfg).items()},
            "fit.lr_resolved": cfg.resolved_lr,
            "clips": ",".join(ctx.clips),
            "clip.length": ctx.length,
            "clip.kind": ctx.kind,
            "objective": ctx.objective,
            "family": family,
        }
    )
    return run


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
