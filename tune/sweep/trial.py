"""What one Ray Tune trial does: fit a pack of clips with one config, evaluate, record and log each fit.

Runs in a Ray worker process. Actors are reused across trials, so the per-process caches here (the corpus index,
the MLflow client, and fewsound.metrics' CDPAM model) are built once per worker and live for many trials.
Logging goes over HTTP to the tracking server, so artifacts reach it from any node of a cluster.

A trial runs one or more packs (fewsound.plan.bundle), each in turn (run_pack: fit, evaluate, record, log); pack k
is logged in a background thread while pack k + 1 fits, and on a GPU also evaluated and recorded there (run_packs).

Nothing computed is lost: each finished fit is first written to the sweep's storage as a record
(fewsound.records: tags, params, metrics, curves, status, the prediction's audio and the spectrogram; the clip's
target audio once per sweep, clip and length), and its MLflow child run is a replay of that record
(tune.sweep.durable.replay: idempotent); once the run holds the files they leave the record (one durable copy). When
the tracking server does not answer (one GET /health), the pack keeps its records and reports them as
`fits_kept`; the driver logs them once the server is back, or a re-run of the same command does. Per fit, the
child run costs a fixed, small number of HTTP calls: create_run (with every tag), one log_batch (params + metrics
+ not-applicable reasons), the artifact uploads (audio/pred.flac, plots/spectrogram.png), set_terminated; each
clip's target adds one upload to the parent run, once per sweep. MLflow's per-run "View run" print (and the extra
get_run behind it) is off via MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT, set by the driver.

Failure handling, from the inside out:
- a fit that diverges (non-finite loss) is refitted with a fresh seed up to `max_retries` times; if it still
  diverges its record (and child run) is FAILED with the reason (tag fewsound.failure_reason); the rest of the
  pack goes on;
- a fit whose evaluation raises is FAILED with that reason; the rest of the pack goes on; a fit whose logging
  fails keeps its record (the driver replays it);
- anything else (the fit itself raising, the worker dying) crashes the pack: the trial's other packs go on, then
  the trial fails and Tune retries it (FailureConfig); a retry skips the fits that already have a FINISHED record
  (logging it if it is not yet), and the driver records what is still missing after the last retry as FAILED.
"""

from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from fewsound import records
from fewsound.device import release_cached_memory
from fewsound.plan import FitTask, pack_from_config
from fewsound.records import FitRecord
from tune.sweep.context import TrialContext, load_clip, pack_id
from tune.sweep.durable import client_defaults
from tune.sweep.record import (
    artifact_files,
    log_records,
    put_targets,
    write_record,
)


def run_pack(pack: dict[str, Any], ctx: TrialContext, pack_index: int = 0) -> dict[str, float]:
    """Fit, evaluate, record and log every fit of one pack (one child run each). Returns counts and timings.

    Result keys: fits_done / fits_failed (fits computed now and recorded FINISHED / FAILED), fits_skipped (a
    FINISHED record was there already: a retried trial), fits_kept (records not logged: the tracking server did
    not answer; the driver replays them), setup_seconds (the resume lookup and loading the clips), fit_seconds
    (the packed fit() calls, retries included), fit_cpu (their CPU seconds in the fitting thread: all of it with
    one torch thread, and unlike wall time not inflated by whatever shares the core), eval_seconds, eval_cpu,
    record_seconds (writing the records, their files' encoding included), artifact_seconds (of that, encoding
    the targets and the fits' files: FLAC, spectrogram PNG), process_cpu (all threads of the trial's process: the
    fit, logging, Ray's own threads; with `overlap` also the next pack's fit), log_seconds, seconds (the whole
    call), start/end (epoch seconds, for concurrency accounting), fit_start/fit_end and eval_start/eval_end (epoch
    seconds of the fit phase and of the evaluation), pid, torch_threads.
    """
    return finish_pack(fit_phase(pack, ctx, pack_index), ctx)


@dataclasses.dataclass
class Fitted:
    """A pack after its fit (`fit_phase`): what evaluating, recording and logging it (`finish_pack`) need."""

    tasks: list[FitTask]  # the fits computed now (those with a FINISHED record are skipped)
    earlier: list[FitRecord]  # their FINISHED records, found at the start (a retried trial)
    clips: np.ndarray | None  # [B, N]
    results: list[Any]
    attempts: list[int]
    pack_index: int
    pid: str  # pack_id of the whole pack
    timing: dict[str, float]
    # some fit of the pack had a record at the start (a retried trial, a re-run): runs of the pack may exist. Runs
    # are only created from records, so without one there is nothing to look up (and the driver marked any run
    # left RUNNING KILLED before Tune started)
    recorded: bool = True


def fit_phase(pack: dict[str, Any], ctx: TrialContext, pack_index: int = 0) -> Fitted:
    """The resume lookup, loading the clips and the packed fit of one pack."""
    start, t0, cpu0 = time.time(), time.perf_counter(), time.process_time()
    tasks = pack_from_config(pack)
    pid = pack_id(tasks)
    root = ctx.records_root
    found = [r for t in tasks if (r := records.read_record(root, ctx.sweep, t.key)) is not None]
    earlier = [r for r in found if r.status == "FINISHED"]
    done_keys = {r.key for r in earlier}
    tasks = [t for t in tasks if t.key not in done_keys]
    clips = np.stack([load_clip(ctx.corpus, t.clip_id, t.length) for t in tasks]) if tasks else None
    setup_seconds = time.perf_counter() - t0  # the resume lookup and loading the clips
    results, attempts, fit_seconds, fit_cpu = _fit_pack(tasks, clips, ctx)
    timing = {"start": start, "t0": t0, "cpu0": cpu0, "setup_seconds": setup_seconds, "fit_seconds": fit_seconds,
              "fit_cpu": fit_cpu, "fit_start": start, "fit_end": time.time()}  # fmt: skip
    return Fitted(tasks, earlier, clips, results, attempts, pack_index, pid, timing, bool(found))


@dataclasses.dataclass
class Recorded:
    """A pack after its evaluation and records (`record_pack`): what logging it (`log_pack`) needs."""

    fitted: Fitted
    new: list[FitRecord]  # the records written now, one per fit computed now
    timing: dict[str, float]  # eval_seconds, eval_cpu, eval_start, eval_end, record_seconds, artifact_seconds


def finish_pack(f: Fitted, ctx: TrialContext) -> dict[str, float]:
    """Evaluate, record and log the fits of a fitted pack; returns run_pack's result. Safe in a thread other than
    the one fitting the next pack (nothing here is shared with a fit but the read-only corpus)."""
    return log_pack(record_pack(f, ctx), ctx)


def record_pack(f: Fitted, ctx: TrialContext) -> Recorded:
    """Evaluate the fits of a fitted pack and write their records (and files): from here nothing is lost."""
    tasks, clips, results, pid = f.tasks, f.clips, f.results, f.pid
    eval_start = time.time()
    t, c = time.perf_counter(), time.thread_time()
    evals, eval_errors = _evaluate(tasks, results, clips, ctx)
    timing = {"eval_seconds": time.perf_counter() - t, "eval_cpu": time.thread_time() - c}
    timing.update(eval_start=eval_start, eval_end=time.time())

    t = time.perf_counter()
    log_curves = f.pack_index % max(1, ctx.curve_every_n_packs) == 0
    targets = put_targets(tasks, results, clips, ctx)
    files = [artifact_files(task, results[i], targets[i][1]) if targets[i] else {} for i, task in enumerate(tasks)]
    timing["artifact_seconds"] = time.perf_counter() - t  # the targets' and the fits' files encoded (and written)
    new = [
        write_record(
            task, results[i], evals[i], eval_errors.get(i), targets[i], files[i], ctx, pid, f.attempts[i],
            log_curves and i == 0,
        )
        for i, task in enumerate(tasks)
    ]  # fmt: skip
    timing["record_seconds"] = time.perf_counter() - t
    return Recorded(f, new, timing)


def log_pack(r: Recorded, ctx: TrialContext) -> dict[str, float]:
    """Log a recorded pack's fits (and any earlier record of the pack not logged yet) as child runs; returns
    run_pack's result. Mostly waits on the tracking server."""
    import torch

    f, t = r.fitted, time.perf_counter()
    log_start = time.time()
    unlogged = [e for e in f.earlier if records.logged_run(ctx.records_root, ctx.sweep, e.key) is None]
    kept = log_records(ctx, f.pid, r.new + unlogged, f.recorded)
    log_seconds = time.perf_counter() - t
    done = sum(e.status == "FINISHED" for e in r.new)
    timing = dict(f.timing, **r.timing)
    t0, cpu0 = timing.pop("t0"), timing.pop("cpu0")
    return {
        "fits_done": done,
        "fits_failed": len(r.new) - done,
        "fits_skipped": len(f.earlier),
        "fits_kept": kept,
        **timing,
        "log_seconds": log_seconds,
        "log_start": log_start,
        "seconds": time.perf_counter() - t0,
        "process_cpu": time.process_time() - cpu0,
        "end": time.time(),
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
    }


def _fit_pack(
    tasks: list[FitTask], clips: np.ndarray | None, ctx: TrialContext
) -> tuple[list[Any], list[int], float, float]:
    """The packed fit of `clips` [B, N]; diverged fits are refitted, each with a fresh seed, up to max_retries
    times. Returns (results, attempts per fit, wall seconds, CPU seconds of this thread)."""
    from fewsound.fit import fit

    results: list[Any] = [None] * len(tasks)
    attempts = [0] * len(tasks)
    fit_seconds = fit_cpu = 0.0
    if not tasks:
        return results, attempts, fit_seconds, fit_cpu
    assert clips is not None
    cfg = tasks[0].cfg
    todo = list(range(len(tasks)))
    while todo:
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
    return results, attempts, fit_seconds, fit_cpu


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


def tune_trainable(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: the trial's packs (`run_packs`), one report per pack once its fits are
    recorded and logged (or kept)."""
    import ray
    import ray.tune
    import torch

    from fewsound.device import claim_gpu_share, resolve_device
    from tune.ray_env import cpu_means_cpu, quiet_exits

    cpu_means_cpu()  # before anything asks torch about CUDA: a trial given no GPU runs on the CPU
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # also when Ray was started elsewhere
    quiet_exits()  # Ray's SIGTERM to a finished actor: no "Exception ignored ... SystemExit" in the sweep's output
    client_defaults()  # fail fast on an unreachable server: the records wait for the driver
    assigned = ray.get_runtime_context().get_assigned_resources()
    torch.set_num_threads(max(1, int(assigned.get("CPU", 1))))  # one torch thread per CPU the trial was given
    # a GPU share: this process capped at it, its packs' chunks sized for it (1.0 where nothing is capped: no CUDA)
    share = claim_gpu_share(assigned.get("GPU"))
    extra = {f"assigned_{k}": float(v) for k, v in assigned.items()}
    extra["gpu_share"] = share
    extra["trial"] = int(config["trial"]["index"])
    # where the fits run, as the trial sees it (a 0-GPU trial: "cpu", with CUDA_VISIBLE_DEVICES "")
    extra["device"] = str(resolve_device("auto"))
    extra["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    errors = run_packs(config["trial"]["packs"], ctx, lambda res: ray.tune.report(dict(res, **extra)))
    if errors:  # a retry skips every fit that already has a FINISHED record (run_pack looks them up)
        raise RuntimeError("; ".join(errors)[:2000])


def overlaps(ctx: TrialContext) -> bool:
    """Whether a trial evaluates a pack while it fits the next: ctx.overlap_evaluation, by default where the fits
    run on a GPU (the GPU need not wait for CPU metrics). On CPU the two would share the trial's cores (and the fit
    loop's GIL), so packs are evaluated in turn there (only their logging, which waits on the server, overlaps)."""
    if ctx.overlap_evaluation is not None:
        return ctx.overlap_evaluation
    import torch

    return torch.cuda.is_available()


def run_packs(packs: list[dict[str, Any]], ctx: TrialContext, report: Any) -> list[str]:
    """Every pack of a trial: fit (`fit_phase`), evaluate and record (`record_pack`), log (`log_pack`);
    `report(result)` per pack, in order, from this thread (result: run_pack's, plus `pack`). Pack k's logging (its
    round trips to the tracking server) runs in a background thread while pack k + 1 fits here; with
    `overlaps(ctx)` (a GPU) so does its evaluation and recording. At most one pack waits: k is reported before
    k + 1 is handed over. A pack that raises is skipped; returns those errors (the trial then fails and Tune
    retries it)."""
    errors: list[str] = []
    overlap = overlaps(ctx)
    pending: tuple[int, Future] | None = None

    def collect() -> None:
        nonlocal pending
        if pending is None:
            return
        index, fut = pending
        pending = None
        try:
            res = fut.result()
        except Exception as e:
            errors.append(f"pack {index}: {type(e).__name__}: {e}")
            return
        report(dict(res, pack=index))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish-pack") as pool:
        for pack in packs:
            index = int(pack["index"])
            try:
                fitted = fit_phase(pack, ctx, index)
            except Exception as e:  # the trial's other packs go on
                errors.append(f"pack {index}: {type(e).__name__}: {e}")
                fitted = None
            collect()  # the previous pack, finished meanwhile
            release_cached_memory()  # the pack's cached GPU blocks back to the card: a reused process must not grow
            if fitted is None:
                continue
            if overlap:
                pending = (index, pool.submit(finish_pack, fitted, ctx))
                continue
            try:  # on the CPU the metrics would share the next fit's cores: evaluated and recorded in turn
                recorded = record_pack(fitted, ctx)
            except Exception as e:
                errors.append(f"pack {index}: {type(e).__name__}: {e}")
                continue
            pending = (index, pool.submit(log_pack, recorded, ctx))
        collect()
    return errors
