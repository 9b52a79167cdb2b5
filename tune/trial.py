"""What one Ray Tune trial does: fit a pack of clips with one config, evaluate, and log one MLflow child run per fit.

Runs in a Ray worker process. Actors are reused across trials, so the per-process caches here (the corpus index,
the MLflow client, and fewsound.metrics' CDPAM model) are built once per worker and live for many trials.
Logging goes over HTTP to the tracking server, so artifacts reach it from any node of a cluster.

A trial runs one or more packs (fewsound.plan.bundle), each in turn (run_pack: fit, evaluate, log).

Per fit, the child run costs a fixed, small number of HTTP calls: create_run (with every tag), one log_batch
(params + metrics + not-applicable reasons), the artifact uploads, set_terminated. MLflow's per-run "View run"
print (and the extra get_run behind it) is off via MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT, set by the driver.

Failure handling, from the inside out:
- a fit that diverges (non-finite loss) is refitted with a fresh seed up to `max_retries` times; if it still
  diverges its child run ends FAILED with the reason (tag fewsound.failure_reason); the rest of the pack goes on;
- a fit whose evaluation or logging raises is FAILED with that reason; the rest of the pack goes on;
- anything else (the fit itself raising, the worker dying) crashes the pack: the trial's other packs go on, then
  the trial fails and Tune retries it (FailureConfig); a retry skips the fits that already have a FINISHED run
  (looked up by each pack's tag), and the driver records what is still missing after the last retry as FAILED.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fewsound.data.audio import peak_normalize, save_audio
from fewsound.plan import FitTask, pack_from_config
from fewsound.tracking import PARENT_TAG

KEY_TAG = "fewsound.fit_key"
SWEEP_TAG = "fewsound.sweep"
PACK_TAG = "fewsound.pack"
REASON_TAG = "fewsound.failure_reason"
COMMIT_TAG = "mlflow.source.git.commit"
LOG_THREADS = 4  # child runs of a pack logged at once (they mostly wait on the server)
_PLOT_LOCK = threading.Lock()
INF_DB = 200.0  # PSNR/SNR of an exact reconstruction is +inf; MLflow stores finite floats only


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its pack (shared by every trial of a sweep)."""

    corpus: str  # where the clips are: a URI (s3://..., gs://...), a path every node mounts, or builtin:<protocol>
    experiment: str
    parent_run_id: str
    sweep: str
    tracking_uri: str
    max_retries: int = 1
    curve_every_n_packs: int = 10  # per-step curves only for a sample of fits (the UI slows with thousands)
    log_artifacts: bool = True  # audio/gt.wav, audio/pred.wav, plots/spectrogram.png per fit
    experiment_id: str | None = None  # resolved once by the driver (None: looked up by name, once per process)
    git_commit: str | None = None  # mlflow.source.git.commit of every child run (resolved once by the driver)
    # Which metrics of fewsound.metrics to compute (None: every metric of the paper that applies to the clip's
    # kind). A subset (e.g. ("mse",)) skips the costly ones (CDPAM, PESQ); benchmarks use it to isolate
    # orchestration. The child runs are logged either way.
    metrics: tuple[str, ...] | None = None


@functools.lru_cache(maxsize=4)
def _corpus(corpus: str) -> Any:
    """The corpus, opened once per worker process; its clips are read when a pack needs them (row groups)."""
    from fewsound.data.shards import open_corpus

    return open_corpus(corpus)


@functools.lru_cache(maxsize=4)
def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@functools.lru_cache(maxsize=16)
def _experiment_id(uri: str, experiment: str) -> str:
    from fewsound.tracking import get_or_create_experiment

    return get_or_create_experiment(_client(uri), experiment)


def load_clip(corpus: str, clip_id: str, length: int) -> np.ndarray:
    """The first `length` samples of a stored clip, peak-normalised as in the paper."""
    clip = _corpus(corpus).clip(clip_id)
    x = clip.audio[:length]
    assert x.shape[0] == length, f"{clip_id}: stored {clip.audio.shape[0]} samples < requested {length}"
    return peak_normalize(np.asarray(x, dtype=np.float32), where=clip_id)


def pack_id(tasks: list[FitTask]) -> str:
    """A stable id of a pack (its fits' keys), tagged on its child runs so a retried trial finds its own."""
    from fewsound.config import cfg_hash

    return cfg_hash(sorted(t.key for t in tasks), 12)


def run_pack(pack: dict[str, Any], ctx: TrialContext, pack_index: int = 0) -> dict[str, float]:
    """Fit, evaluate and log every fit of one pack (one child run each). Returns counts and timings.

    Result keys: fits_done, fits_failed, fits_skipped (already FINISHED: a retried trial), setup_seconds (the
    resume lookup and loading the clips), fit_seconds (the packed fit() calls, retries included), fit_cpu (their
    CPU seconds in the fitting thread: all of it with one torch thread, and unlike wall time not inflated by
    whatever shares the core), eval_seconds, eval_cpu, process_cpu (all threads of the trial's process: the
    fit, logging, Ray's own threads), log_seconds, seconds (the whole call), start/end (epoch
    seconds, for concurrency accounting), pid, torch_threads.
    """
    import torch

    from fewsound.fit import fit

    start = time.time()
    t0, cpu0 = time.perf_counter(), time.process_time()
    tasks = pack_from_config(pack)
    pid = pack_id(tasks)
    client = _client(ctx.tracking_uri)
    exp_id = ctx.experiment_id or _experiment_id(ctx.tracking_uri, ctx.experiment)
    finished = _finished_keys(client, exp_id, ctx.sweep, pid)
    skipped = sum(t.key in finished for t in tasks)
    tasks = [t for t in tasks if t.key not in finished]

    cfg = tasks[0].cfg if tasks else None
    results: list[Any] = [None] * len(tasks)
    attempts = [0] * len(tasks)
    fit_seconds = fit_cpu = 0.0
    if tasks:
        clips = np.stack([load_clip(ctx.corpus, t.clip_id, t.length) for t in tasks])
    setup_seconds = time.perf_counter() - t0  # the resume lookup and loading the clips
    if tasks:
        todo = list(range(len(tasks)))
        while todo:  # refit the diverged ones, each with a fresh seed, up to max_retries times
            seeds = [cfg.seed + 1_000_003 * attempts[i] + i for i in todo]
            t, c = time.perf_counter(), time.thread_time()
            out = fit(cfg, clips[todo], seeds=seeds)
            fit_seconds += time.perf_counter() - t
            fit_cpu += time.thread_time() - c
            retry = []
            for i, r in zip(todo, out):
                results[i] = r
                attempts[i] += 1
                if r.diverged and attempts[i] <= ctx.max_retries:
                    retry.append(i)
            todo = retry

    t, c = time.perf_counter(), time.thread_time()
    evals, eval_errors = _evaluate(tasks, results, clips if tasks else None, ctx)
    eval_seconds, eval_cpu = time.perf_counter() - t, time.thread_time() - c

    t = time.perf_counter()
    log_curves = pack_index % max(1, ctx.curve_every_n_packs) == 0
    done, failed = _log_pack(
        client,
        exp_id,
        tasks,
        results,
        evals,
        eval_errors,
        clips if tasks else None,
        ctx,
        pid,
        attempts,
        log_curves,
    )
    log_seconds = time.perf_counter() - t
    return {
        "fits_done": done,
        "fits_failed": failed,
        "fits_skipped": skipped,
        "setup_seconds": setup_seconds,
        "fit_seconds": fit_seconds,
        "eval_seconds": eval_seconds,
        "log_seconds": log_seconds,
        "seconds": time.perf_counter() - t0,
        "fit_cpu": fit_cpu,
        "eval_cpu": eval_cpu,
        "process_cpu": time.process_time() - cpu0,
        "start": start,
        "end": time.time(),
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
    }


def _finished_keys(client: Any, exp_id: str, sweep: str, pid: str) -> set[str]:
    """Keys of this pack that already have a FINISHED run (a trial retried by Tune after it crashed)."""
    runs = client.search_runs(
        [exp_id],
        filter_string=f"attributes.status = 'FINISHED' and "
        f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{PACK_TAG}` = '{pid}'",
        max_results=5000,
    )
    return {r.data.tags[KEY_TAG] for r in runs if KEY_TAG in r.data.tags}


def _evaluate(
    tasks: list[FitTask], results: list[Any], clips: np.ndarray | None, ctx: TrialContext
) -> tuple[list[dict | None], dict[int, str]]:
    """Metrics of every fit that did not diverge, batched per clip kind. A batch that raises is redone fit by fit,
    so one bad fit (e.g. a silent reconstruction) only fails itself. Returns (evals, {index: error})."""
    from fewsound.metrics import evaluate

    evals: list[dict | None] = [None] * len(tasks)
    errors: dict[int, str] = {}
    by_kind: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        if not results[i].diverged:
            by_kind.setdefault(t.kind, []).append(i)
    sr = tasks[0].cfg.sample_rate if tasks else 0
    for kind, idx in by_kind.items():
        groups = [idx]
        while groups:
            g = groups.pop()
            try:
                recs = np.stack([results[i].reconstruction for i in g])
                rows = evaluate(clips[g], recs, sr, kind=kind, metrics=ctx.metrics, names=[tasks[i].key for i in g])
                for i, row in zip(g, rows):
                    evals[i] = row
            except Exception as e:
                if len(g) > 1:
                    groups.extend([i] for i in g)
                else:
                    errors[g[0]] = f"{type(e).__name__}: {e}"[:500]
    return evals, errors


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        out[k] = max(-INF_DB, min(INF_DB, v)) if math.isinf(v) else v
    return out


def _log_pack(
    client: Any,
    exp_id: str,
    tasks: list[FitTask],
    results: list[Any],
    evals: list[dict | None],
    eval_errors: dict[int, str],
    clips: np.ndarray | None,
    ctx: TrialContext,
    pid: str,
    attempts: list[int],
    log_curves: bool,
) -> tuple[int, int]:
    """The pack's child runs, one per fit, through MLflow's client: the run with its tags, params and metrics,
    then its artifacts, then its final status - a run is FINISHED only once its artifacts are there. A diverged
    fit or failed evaluation is a FAILED run with its reason. A fit whose logging fails is counted failed (a
    retry or resume re-runs it); the pack's other fits are not affected. Returns (done, failed)."""
    from fewsound.tracking import log_run

    def log_one(i: int) -> bool:
        task, r = tasks[i], results[i]
        reason = None
        if r.diverged:
            reason = f"diverged at step {r.diverged_step} (non-finite loss) after {attempts[i]} attempt(s)"
        elif i in eval_errors:
            reason = f"evaluation failed: {eval_errors[i]}"
        spec = _run_spec(task, r, evals[i], ctx, pid, reason, attempts[i], curve=log_curves and i == 0)
        with_artifacts = ctx.log_artifacts and not r.diverged
        final = spec.pop("status")
        try:
            run_id = log_run(client, exp_id, **spec, status="RUNNING" if with_artifacts else final)
            if with_artifacts:
                _log_artifacts(client, run_id, task, r, clips[i])
                client.set_terminated(run_id, status=final)
        except Exception as e:
            print(f"[{task.key}] logging to MLflow failed: {type(e).__name__}: {e}", flush=True)
            return False
        return reason is None

    # each run is a few HTTP round trips that mostly wait on the server: a few at once hide that latency
    with ThreadPoolExecutor(max_workers=LOG_THREADS) as pool:
        ok = list(pool.map(log_one, range(len(tasks))))
    return sum(ok), len(ok) - sum(ok)


def _run_spec(
    task: FitTask, r: Any, ev: dict | None, ctx: TrialContext, pid: str, reason: str | None, attempts: int, curve: bool
) -> dict[str, Any]:
    """One fit's child run for fewsound.tracking.log_run: tags (parent, sweep, pack, key, ...), params, final metrics,
    n/a reasons as tags, the loss curve when `curve`; FINISHED, or FAILED with the reason."""
    from fewsound.metrics import to_mlflow

    tags = {
        KEY_TAG: task.key,
        SWEEP_TAG: ctx.sweep,
        PACK_TAG: pid,
        PARENT_TAG: ctx.parent_run_id,
        "fewsound.family": task.family,
        "fewsound.label": task.label,
        "fewsound.attempts": attempts,
        "fewsound.node": _node(),
    }
    if ctx.git_commit:
        tags[COMMIT_TAG] = ctx.git_commit
    if reason:
        tags[REASON_TAG] = reason[:5000]
    metrics = dict(r.metrics())
    if ev is not None:
        metrics.update(to_mlflow(ev))
        tags.update({f"fewsound.na.{k}": v[:250] for k, v in ev.get("not_applicable", {}).items()})
    return {
        "run_name": task.key,
        "tags": {k: str(v) for k, v in tags.items()},
        "params": {k: str(v)[:6000] for k, v in task.params().items()},
        "metrics": _finite(metrics),
        "curves": {"fit/loss_curve": [(step, v) for step, v in r.history if math.isfinite(v)]} if curve else {},
        "status": "FINISHED" if reason is None else "FAILED",
    }


def _log_artifacts(client: Any, run_id: str, task: FitTask, r: Any, ref: np.ndarray) -> None:
    """audio/gt.wav, audio/pred.wav and plots/spectrogram.png of one fit (proxied upload through the server)."""
    from fewsound.report import save_spectrogram_png

    with tempfile.TemporaryDirectory() as d:
        sr = task.cfg.sample_rate
        save_audio(Path(d) / "audio" / "gt.wav", ref, sr)
        save_audio(Path(d) / "audio" / "pred.wav", r.reconstruction, sr)
        with _PLOT_LOCK:  # fits of a pack are logged from a few threads; matplotlib is not thread-safe
            save_spectrogram_png(Path(d) / "plots" / "spectrogram.png", ref, r.reconstruction, sr, title=task.key)
        client.log_artifacts(run_id, d)


def _node() -> str:
    """The Ray node this fit ran on (its hostname outside Ray): where a cluster placed each fit."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    import socket

    return socket.gethostname()


def tune_trainable(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: the trial's packs one after the other, one report per pack once its fits are
    logged.

    Logging a pack in a background thread while the next one fits was measured slower on CPU (2 cores: the
    tracking server needs the same cores, and the logging thread the fit loop's GIL), so packs log in turn."""
    import ray
    import ray.tune
    import torch

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # also when Ray was started elsewhere
    assigned = ray.get_runtime_context().get_assigned_resources()
    torch.set_num_threads(max(1, int(assigned.get("CPU", 1))))  # one torch thread per CPU the trial was given
    extra = {f"assigned_{k}": float(v) for k, v in assigned.items()}
    extra["trial"] = int(config["trial"]["index"])
    errors = []
    for pack in config["trial"]["packs"]:
        try:
            res = run_pack(pack, ctx, int(pack["index"]))
        except Exception as e:  # the trial's other packs go on; the trial then fails and Tune retries it
            errors.append(f"pack {pack['index']}: {type(e).__name__}: {e}")
            continue
        ray.tune.report(dict(res, pack=int(pack["index"]), **extra))
    if errors:  # a retry skips every fit that already has a FINISHED run (run_pack looks them up)
        raise RuntimeError("; ".join(errors)[:2000])
