"""What one Ray Tune trial does: fit a pack of clips with one config, evaluate, and log one MLflow child run per fit.

Runs in a Ray worker process (actors are reused across trials, so caches here live for many trials). Logging
goes over HTTP to the tracking server, so artifacts reach it from any node of a cluster.

A fit that diverges is retried with a fresh seed up to `max_retries` times; if it still diverges its child run
ends FAILED with the reason, and the other fits of the pack are unaffected.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from fewsound.data.audio import peak_normalize, save_audio
from fewsound.tracking import MlflowRun
from tune.plan import FitTask, pack_from_config

KEY_TAG = "fewsound.fit_key"
SWEEP_TAG = "fewsound.sweep"
REASON_TAG = "fewsound.failure_reason"
INF_DB = 200.0  # PSNR/SNR of an exact reconstruction is +inf; MLflow stores finite floats only


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its pack (shared by every trial of a sweep)."""

    corpus: str  # a prepared corpus folder
    experiment: str
    parent_run_id: str
    sweep: str
    tracking_uri: str
    max_retries: int = 1
    curve_every_n_packs: int = 10  # per-step curves only for a sample of fits (the UI slows with thousands)
    log_artifacts: bool = True


@functools.lru_cache(maxsize=4)
def _corpus_clips(corpus: str) -> dict[str, Any]:
    from fewsound.data.shards import open_corpus

    return {c.clip_id: c for c in open_corpus(corpus).clips()}


def load_clip(corpus: str, clip_id: str, length: int) -> np.ndarray:
    """The first `length` samples of a stored clip, peak-normalised as in the paper."""
    clip = _corpus_clips(corpus)[clip_id]
    x = clip.audio[:length]
    assert x.shape[0] == length, f"{clip_id}: stored {clip.audio.shape[0]} samples < requested {length}"
    return peak_normalize(np.asarray(x, dtype=np.float32), where=clip_id)


def run_pack(pack: dict[str, Any], ctx: TrialContext, pack_index: int = 0) -> dict[str, float]:
    """Fit, evaluate and log every fit of one pack. Returns counts for Tune's result."""
    import torch

    from fewsound.fit import fit
    from fewsound.metrics import evaluate

    tasks = pack_from_config(pack)
    cfg = tasks[0].cfg
    clips = np.stack([load_clip(ctx.corpus, t.clip_id, t.length) for t in tasks])
    sr = cfg.sample_rate
    t0 = time.perf_counter()
    results: list[Any] = [None] * len(tasks)
    todo = list(range(len(tasks)))
    attempts = [0] * len(tasks)
    base_seed = cfg.seed
    while todo:
        seeds = [base_seed + 1_000_003 * attempts[i] + i for i in todo]
        out = fit(cfg, clips[todo], seeds=seeds)
        retry = []
        for i, r in zip(todo, out):
            results[i] = r
            attempts[i] += 1
            if r.diverged and attempts[i] <= ctx.max_retries:
                retry.append(i)
        todo = retry
    fit_seconds = time.perf_counter() - t0

    done = failed = 0
    by_kind: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        by_kind.setdefault(t.kind, []).append(i)
    evals: list[dict | None] = [None] * len(tasks)
    for kind, idx in by_kind.items():
        ok = [i for i in idx if not results[i].diverged]
        if ok:
            recs = np.stack([results[i].reconstruction for i in ok])
            for i, row in zip(ok, evaluate(clips[ok], recs, sr, kind=kind, names=[tasks[i].key for i in ok])):
                evals[i] = row
    log_curves = pack_index % max(1, ctx.curve_every_n_packs) == 0
    for i, t in enumerate(tasks):
        status, reason = "FINISHED", None
        r = results[i]
        if r.diverged:
            status = "FAILED"
            reason = f"diverged at step {r.diverged_step} (non-finite loss) after {attempts[i]} attempt(s)"
        try:
            _log_child(t, r, evals[i], clips[i], ctx, status, reason, attempts[i], log_curves and i == 0)
        except Exception:  # logging failed: record it, do not lose the other fits of the pack
            traceback.print_exc()
            status = "FAILED"
        done += status == "FINISHED"
        failed += status != "FINISHED"
    torch_threads = torch.get_num_threads()
    return {"fits_done": done, "fits_failed": failed, "fit_seconds": fit_seconds,
            "seconds": time.perf_counter() - t0, "torch_threads": torch_threads}


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        out[k] = max(-INF_DB, min(INF_DB, v)) if math.isinf(v) else v
    return out


def _log_child(task: FitTask, r: Any, ev: dict | None, ref: np.ndarray, ctx: TrialContext, status: str,
               reason: str | None, attempts: int, curve: bool) -> None:
    from fewsound.metrics import to_mlflow

    tags = {KEY_TAG: task.key, SWEEP_TAG: ctx.sweep, "fewsound.family": task.family, "fewsound.label": task.label,
            "fewsound.attempts": attempts}
    if reason:
        tags[REASON_TAG] = reason
    run = MlflowRun(ctx.experiment, uri=ctx.tracking_uri, run_name=task.key, parent_run_id=ctx.parent_run_id,
                    tags=tags)
    try:
        run.log_params(task.params())
        metrics = dict(r.metrics())
        if ev is not None:
            metrics.update(to_mlflow(ev))
            if ev.get("not_applicable"):
                run.set_tags({f"fewsound.na.{k}": v[:250] for k, v in ev["not_applicable"].items()})
        run.log_metrics(_finite(metrics))
        if curve:
            for step, loss in r.history:
                run.log_metrics(_finite({"fit/loss_curve": loss}), step=step)
        if ctx.log_artifacts and not r.diverged:
            from fewsound.report import save_spectrogram_png

            with tempfile.TemporaryDirectory() as d:
                sr = task.cfg.sample_rate
                save_audio(Path(d) / "gt.wav", ref, sr)
                save_audio(Path(d) / "pred.wav", r.reconstruction, sr)
                run.log_artifact(Path(d) / "gt.wav", "audio")
                run.log_artifact(Path(d) / "pred.wav", "audio")
                save_spectrogram_png(Path(d) / "spectrogram.png", ref, r.reconstruction, sr)
                run.log_artifact(Path(d) / "spectrogram.png", "plots")
    except BaseException:
        run.end("FAILED")
        raise
    run.end(status)


def tune_trainable(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: one pack per trial. Reports once, when the pack is done."""
    import ray
    import ray.tune
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))  # one torch thread per CPU the trial was given
    os.environ["MLFLOW_TRACKING_URI"] = ctx.tracking_uri
    res = run_pack(config["pack"], ctx, int(config["pack"]["index"]))
    ray.tune.report(res)

