"""Every metric of the paper, and `evaluate()` = all that apply to a batch of (reference, reconstruction) pairs.

    from fewsound.metrics import evaluate, to_mlflow
    rows = evaluate(refs, recs, sr=22050, kind="speech")      # refs, recs: [B, N] arrays or tensors
    rows[0] == {"mse": 1.2e-4, "psnr": 45.1, ..., "cdpam": 0.08, "not_applicable": {}}
    mlflow.log_metrics(to_mlflow(rows[0]))                     # {"eval/mse": 1.2e-4, ...}

Result of one clip: a dict with one float per metric that was computed, in METRICS order, plus
`not_applicable: {name: reason}` for every requested metric that does not apply to that clip. A metric is in
exactly one of the two. Nothing is ever reported as a silent NaN or 0:
  - PESQ, STOI and CDPAM only apply to clean speech (kind="speech"); for noisy_speech, music and environment they
    are not applicable, as in the paper (Section 4.3, Table 6);
  - PESQ without a detectable utterance, STOI with too little non-silent signal, WD of an all-zero spectrum, and
    any other NaN are not applicable with the reason.
PSNR, SNR and SI-SNR of a perfect reconstruction are +inf (see fewsound.metrics.signal).

Which modules compute what (each documents its formula and how it matches the paper's code):
  signal.py (mse, psnr, snr, si_snr), lsd.py, wasserstein.py (wd_hf), pesq.py, stoi.py, cdpam.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fewsound.data.audio import check_samples
from fewsound.errors import AudioError, ConfigError
from fewsound.metrics.common import NotApplicable, as_batch, make_pool
from fewsound.metrics.lsd import lsd
from fewsound.metrics.signal import mse, psnr, si_snr, snr
from fewsound.metrics.wasserstein import wasserstein_hf

# The paper's metrics (computed by default), then the variants computed only on request.
METRICS = ("mse", "psnr", "snr", "si_snr", "lsd", "wd_hf", "pesq", "stoi", "cdpam")
EXTRA_METRICS = ("pesq_nb", "estoi")  # narrow-band PESQ, extended STOI
SPEECH_ONLY = frozenset({"pesq", "pesq_nb", "stoi", "estoi", "cdpam"})
KINDS = ("speech", "noisy_speech", "music", "environment")
_CPU_PAIRWISE = frozenset({"pesq", "pesq_nb", "stoi", "estoi"})  # per-pair C/numpy code: worth a process pool

__all__ = ["METRICS", "EXTRA_METRICS", "KINDS", "SPEECH_ONLY", "NotApplicable", "evaluate", "to_mlflow"]


def evaluate(
    refs,
    recs,
    sr: int,
    kind: str = "speech",
    metrics=None,
    *,
    device=None,
    workers: int = 0,
    cdpam_batch_size: int = 32,
    names: list[str] | None = None,
) -> list[dict]:
    """All applicable metrics for each pair; returns B dicts (see the module docstring for their shape).

    refs, recs: `[B, N]` (or `[N]`) float arrays/tensors at `sr`, reference first. kind: one of KINDS.
    metrics: names from METRICS + EXTRA_METRICS (default: METRICS). device: for CDPAM (default CUDA when present).
    workers: > 1 computes PESQ/STOI in that many processes, overlapping with CDPAM (default: in this process).
    names: per-clip labels used in error messages (e.g. file names).
    Raises AudioError for a shape mismatch, NaN/Inf samples, or a silent reference; ConfigError for an unknown
    kind or metric name.
    """
    if kind not in KINDS:
        raise ConfigError("kind", f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    wanted = list(METRICS) if metrics is None else list(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in METRICS + EXTRA_METRICS]
    if unknown:
        raise ConfigError("metrics", f"unknown metric(s) {unknown}; expected names from {METRICS + EXTRA_METRICS}")
    x, y = as_batch(refs, "refs"), as_batch(recs, "recs")
    names = list(names) if names is not None else [f"clip {i}" for i in range(len(x))]
    _validate(x, y, names)

    not_applicable: list[dict[str, str]] = [{} for _ in range(len(x))]
    run = wanted
    if kind != "speech":
        for m in (m for m in wanted if m in SPEECH_ONLY):
            for na in not_applicable:
                na[m] = f"{m} is defined for clean speech only; the paper omits it for kind {kind!r}"
        run = [m for m in wanted if m not in SPEECH_ONLY]

    values = _compute(x, y, sr, run, device=device, workers=workers, cdpam_batch_size=cdpam_batch_size)
    rows = []
    for i, na in enumerate(not_applicable):
        row: dict[str, Any] = {}
        for m in run:
            v = values[m][i]
            if isinstance(v, NotApplicable):
                na[m] = v.reason
            elif math.isnan(v):
                na[m] = f"{m} is undefined for this pair (NaN; e.g. an all-zero reconstruction)"
            else:
                row[m] = float(v)
        row["not_applicable"] = {m: na[m] for m in wanted if m in na}
        rows.append(row)
    return rows


def to_mlflow(result: dict, prefix: str = "eval/") -> dict[str, float]:
    """One clip's result -> flat `{"eval/<name>": float}` for MLflow (not-applicable metrics are left out)."""
    return {f"{prefix}{k}": float(v) for k, v in result.items() if k != "not_applicable"}


def _validate(x: np.ndarray, y: np.ndarray, names: list[str]) -> None:
    if len(names) != len(x):
        raise ValueError(f"{len(names)} names for {len(x)} clips")
    if x.shape != y.shape:
        where = names[0] if len(x) == 1 else "recs"
        raise AudioError(where, f"reference and reconstruction differ in shape: {x.shape} vs {y.shape}")
    for i, name in enumerate(names):
        check_samples(x[i], where=f"{name} (reference)", allow_silent=False)
        check_samples(y[i], where=f"{name} (reconstruction)")


def _compute(x, y, sr, run, *, device, workers, cdpam_batch_size) -> dict[str, list]:
    """name -> B values (float or NotApplicable) for every metric in `run`."""
    out: dict[str, list] = {}
    pool = make_pool(workers) if workers > 1 and _CPU_PAIRWISE.intersection(run) else None
    try:
        # The per-pair CPU metrics are submitted first so that a pool works on them while CDPAM runs here.
        pending = {}
        if "pesq" in run or "pesq_nb" in run:
            from fewsound.metrics.pesq import pesq_scores

            for m, mode in (("pesq", "wb"), ("pesq_nb", "nb")):
                if m in run:
                    pending[m] = pesq_scores(x, y, sr, mode=mode, pool=pool, workers=workers)
        if "stoi" in run or "estoi" in run:
            from fewsound.metrics.stoi import stoi_scores

            for m, ext in (("stoi", False), ("estoi", True)):
                if m in run:
                    pending[m] = stoi_scores(x, y, sr, extended=ext, pool=pool, workers=workers)
        for m, fn in (("mse", mse), ("psnr", psnr), ("snr", snr), ("si_snr", si_snr), ("wd_hf", wasserstein_hf)):
            if m in run:
                out[m] = list(fn(x, y))
        if "lsd" in run:
            out["lsd"] = list(lsd(x, y, sr))
        if "cdpam" in run:
            from fewsound.metrics.cdpam import cdpam_distance

            out["cdpam"] = list(cdpam_distance(x, y, sr, device=device, batch_size=cdpam_batch_size))
        for m, results in pending.items():
            out[m] = list(results)
    finally:
        if pool is not None:
            pool.shutdown()
    return out
