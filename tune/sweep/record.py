"""What a trial keeps of each fit: its record in the sweep's storage first (metrics, the prediction as FLAC, the
spectrogram; each clip's target once), then its replay as a child run of the sweep's parent (tune.sweep.durable).
"""

from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fewsound import records
from fewsound.data.audio import flac_bytes
from fewsound.plan import FitTask
from fewsound.records import FitRecord
from fewsound.tracking import PARENT_TAG, server_health
from tune.spine import (
    ATTEMPTS_TAG,
    FAMILY_TAG,
    FIT_KEY_TAG,
    LABEL_TAG,
    NODE_TAG,
    NOT_APPLICABLE_PREFIX,
    PACK_TAG,
    REASON_TAG,
    SWEEP_TAG,
    TARGET_AUDIO_TAG,
    tag_filter,
)
from tune.sweep.context import TrialContext, experiment_id_of, tracking_client
from tune.sweep.durable import HEALTH_TIMEOUT, LOG_THREADS, TARGETS_DIR, replay, replay_targets, runs_by_key

COMMIT_TAG = "mlflow.source.git.commit"
# Per fit: the prediction, 16-bit FLAC (quantized: metrics are computed on the float signals before storage), and
# target | prediction | difference as a palette PNG. The target is stored once per clip and length (TARGET_AUDIO_TAG).
ARTIFACT_FILES = ("audio/pred.flac", "plots/spectrogram.png")
INF_DB = 200.0  # PSNR/SNR of an exact reconstruction is +inf; MLflow stores finite floats only


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        out[k] = max(-INF_DB, min(INF_DB, v)) if math.isinf(v) else v
    return out


def write_record(
    task: FitTask,
    r: Any,
    ev: dict | None,
    eval_error: str | None,
    target: tuple[str, np.ndarray] | None,
    files: dict[str, bytes],
    ctx: TrialContext,
    pid: str,
    attempts: int,
    curve: bool,
) -> FitRecord:
    """One fit's record in the sweep's storage, written before anything is logged: FINISHED, or FAILED with the
    reason (diverged, or its evaluation failed); for a fit that did not diverge, its prediction's audio and the
    spectrogram (`files`, from artifact_files), and a reference to its clip's target (`target`: its name in the
    sweep's storage, and the audio)."""
    reason = None
    if r.diverged:
        reason = f"diverged at step {r.diverged_step} (non-finite loss) after {attempts} attempt(s)"
    elif eval_error is not None:
        reason = f"evaluation failed: {eval_error}"
    spec = _run_spec(task, r, ev, ctx, pid, reason, attempts, curve)
    if target is not None:
        spec["tags"][TARGET_AUDIO_TAG] = f"{TARGETS_DIR}/{target[0]}"
    rec = FitRecord(key=task.key, sweep=ctx.sweep, reason=reason, **spec)
    return records.write_record(ctx.records_root, rec, files)


def put_targets(
    tasks: list[FitTask], results: list[Any], clips: np.ndarray | None, ctx: TrialContext
) -> list[tuple[str, np.ndarray] | None]:
    """Each clip's target audio (16-bit FLAC) in the sweep's storage, once per sweep, clip, length and sample rate
    (fewsound.records.put_target), before the records that reference it. Returns per fit (name, the target [N]),
    None for a fit that gets no files (diverged, or artifacts off)."""
    out: list[tuple[str, np.ndarray] | None] = [None] * len(tasks)
    if not ctx.log_artifacts or clips is None:
        return out
    seen = set()
    for i, t in enumerate(tasks):
        if results[i].diverged:
            continue
        sr = t.cfg.sample_rate
        name = records.target_name(t.clip_id, t.length, sr)
        if name not in seen:
            seen.add(name)
            records.put_target(ctx.records_root, ctx.sweep, name, functools.partial(flac_bytes, clips[i], sr))
        out[i] = (name, clips[i])
    return out


def log_records(ctx: TrialContext, pid: str, recs: list[FitRecord], recorded: bool = True) -> int:
    """Replay `recs` as child runs, a few at once (each mostly waits on the server). When the server does not
    answer, the rest stay kept for the driver. `recorded`: the pack's fits had records before this trial (else
    their runs, which only records create, cannot exist: the search for them is skipped, one request per pack
    whose cost grows with the experiment's runs). Returns how many were not logged."""
    if not recs:
        return 0
    if server_health(ctx.tracking_uri, HEALTH_TIMEOUT) is not None:
        return len(recs)
    client = tracking_client(ctx.tracking_uri)
    exp_id = ctx.experiment_id or experiment_id_of(ctx.tracking_uri, ctx.experiment)
    down = threading.Event()
    targets = {rec.tags[TARGET_AUDIO_TAG].rpartition("/")[2] for rec in recs if TARGET_AUDIO_TAG in rec.tags}
    try:  # the targets first: a logged fit's reference resolves
        replay_targets(client, ctx.records_root, ctx.sweep, ctx.parent_run_id, targets)
        where = f"{tag_filter(SWEEP_TAG, ctx.sweep)} and {tag_filter(PACK_TAG, pid)}"
        runs = runs_by_key(client, exp_id, where) if recorded else {}
    except Exception:
        return len(recs)

    def log_one(rec: FitRecord) -> bool:
        if down.is_set():
            return False
        try:
            replay(client, exp_id, ctx.records_root, rec, ctx.parent_run_id, runs.get(rec.key, []))
            return True
        except Exception as e:
            if server_health(ctx.tracking_uri, HEALTH_TIMEOUT) is not None:
                down.set()  # the server went away: the records wait for the driver
            else:
                print(f"[{rec.key}] logging to MLflow failed (record kept): {type(e).__name__}: {e}", flush=True)
            return False

    with ThreadPoolExecutor(max_workers=LOG_THREADS) as pool:
        return len(recs) - sum(pool.map(log_one, recs))


def _run_spec(
    task: FitTask, r: Any, ev: dict | None, ctx: TrialContext, pid: str, reason: str | None, attempts: int, curve: bool
) -> dict[str, Any]:
    """One fit's child run as its record keeps it (fewsound.records.FitRecord's fields): tags (parent, sweep, pack,
    key, ...), params, final metrics, n/a reasons as tags, the loss curve when `curve`; FINISHED, or FAILED with
    the reason."""
    from fewsound.metrics import to_mlflow

    tags = {
        FIT_KEY_TAG: task.key,
        SWEEP_TAG: ctx.sweep,
        PACK_TAG: pid,
        PARENT_TAG: ctx.parent_run_id,
        FAMILY_TAG: task.family,
        LABEL_TAG: task.label,
        ATTEMPTS_TAG: attempts,
        NODE_TAG: _node(),
    }
    if ctx.git_commit:
        tags[COMMIT_TAG] = ctx.git_commit
    if reason:
        tags[REASON_TAG] = reason[:5000]
    metrics = dict(r.metrics())
    if ev is not None:
        metrics.update(to_mlflow(ev))
        tags.update({f"{NOT_APPLICABLE_PREFIX}{k}": v[:250] for k, v in ev.get("not_applicable", {}).items()})
    return {
        "run_name": task.key,
        "tags": {k: str(v) for k, v in tags.items()},
        "params": {k: str(v)[:6000] for k, v in task.params().items()},
        "metrics": _finite(metrics),
        "curves": {"fit/loss_curve": [(step, v) for step, v in r.history if math.isfinite(v)]} if curve else {},
        "status": "FINISHED" if reason is None else "FAILED",
    }


def artifact_files(task: FitTask, r: Any, ref: np.ndarray) -> dict[str, bytes]:
    """ARTIFACT_FILES of one fit, as bytes: audio/pred.flac (the reconstruction quantized to 16 bits; its metrics
    were computed before, on the float signal) and plots/spectrogram.png (target | prediction | difference)."""
    from fewsound.report import spectrogram_png

    sr = task.cfg.sample_rate
    pred = np.asarray(r.reconstruction, dtype=np.float32).reshape(-1)
    return {
        "audio/pred.flac": flac_bytes(pred, sr),
        "plots/spectrogram.png": spectrogram_png(ref, pred, sr, title=task.key),
    }


def _node() -> str:
    """The Ray node this fit ran on (its hostname outside Ray): where a cluster placed each fit."""
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    import socket

    return socket.gethostname()
