"""Validation: a fixed subset of clips, every metric of FewSound's reconstructions and of its universal weights
alone (the gap is what the hypernetwork contributes); a trained model's evaluation."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from fewsound.losses import fit_loss

if TYPE_CHECKING:
    pass

from fewsound.train.batches import validation_crop
from fewsound.train.config import TrainConfig
from fewsound.train.step import unwrap


def choose_validation(clip_ids: Sequence[str], kinds: Sequence[str], n: int, n_log: int, seed: int = 0):
    """(indices of the validation subset, indices of the clips to log audio for), both into `clip_ids`.

    The subset: `n` clips picked at random with a fixed seed (the code's randperm(seed 0)[:512]), kept in corpus
    order. The logged clips: round-robin over the kinds present (speech, music, environment), in subset order.
    """
    total = len(clip_ids)
    rng = np.random.default_rng(seed)
    subset = sorted(rng.permutation(total)[: min(n, total)].tolist()) if n < total else list(range(total))
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i in subset:
        by_kind[kinds[i]].append(i)
    logged: list[int] = []
    queues = [list(v) for _, v in sorted(by_kind.items())]
    while len(logged) < min(n_log, len(subset)):
        for q in queues:
            if q and len(logged) < n_log:
                logged.append(q.pop(0))
    return subset, sorted(logged)


@torch.no_grad()
def reconstruct(
    model: torch.nn.Module, clips: np.ndarray, *, batch_size: int = 16, device: torch.device | None = None
) -> np.ndarray:
    """The model's reconstructions of validation clips [V, N] -> [V, N] (eval mode, no grad)."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    device = device or next(m.parameters()).device
    out = [
        m(torch.from_numpy(np.ascontiguousarray(clips[i : i + batch_size])).to(device)).float().cpu().numpy()
        for i in range(0, len(clips), batch_size)
    ]
    m.train(was_training)
    return np.concatenate(out) if out else np.zeros_like(clips)


@torch.no_grad()
def universal_reconstruction(model: torch.nn.Module, n_samples: int) -> np.ndarray | None:
    """FewSound's universal INR alone (delta = 0): [n_samples]; None for HyperSound (no universal weights)."""
    m = unwrap(model)
    if m.config.kind != "fewsound":
        return None
    return m.universal(n_samples).float().cpu().numpy().reshape(-1)


def validate(
    model: torch.nn.Module,
    clips: np.ndarray,
    kinds: Sequence[str],
    cfg: TrainConfig,
    ids: Sequence[str] | None = None,
    *,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """Per-clip validation rows for clips [V, N] (already the validation crop): the loss and every metric of
    `cfg.val_metrics` for the model's reconstruction, and (FewSound) for the universal weights alone.

    Row: {"clip_id", "kind", "loss", "universal_loss", "metrics": {...}, "universal": {...}}.
    """
    from fewsound.metrics import evaluate

    clips = np.asarray(clips, dtype=np.float32)
    ids = list(ids) if ids is not None else [f"clip {i}" for i in range(len(clips))]
    recs = reconstruct(model, clips, device=device)
    uni = universal_reconstruction(model, clips.shape[1])
    ref_t = torch.from_numpy(clips)

    def loss(pred: np.ndarray) -> np.ndarray:  # [V, N] -> [V]
        return fit_loss(
            torch.from_numpy(pred), ref_t, lambda_t=cfg.lambda_t, lambda_f=cfg.lambda_f, sr=cfg.model.sample_rate
        ).numpy()

    losses = loss(recs)
    rows = [{"clip_id": ids[i], "kind": kinds[i], "loss": float(losses[i]), "metrics": {}} for i in range(len(clips))]
    if uni is not None:
        uni_b = np.broadcast_to(uni, clips.shape).copy()
        uni_losses = loss(uni_b)
        for r, ul in zip(rows, uni_losses):
            r["universal_loss"], r["universal"] = float(ul), {}
    for kind in sorted(set(kinds)):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        names = [ids[i] for i in idx]
        for i, res in zip(
            idx, evaluate(clips[idx], recs[idx], cfg.model.sample_rate, kind, cfg.val_metrics, names=names)
        ):
            rows[i]["metrics"] = res
        if uni is not None:
            for i, res in zip(
                idx,
                evaluate(
                    clips[idx],
                    np.broadcast_to(uni, (len(idx), uni.shape[0])),
                    cfg.model.sample_rate,
                    kind,
                    cfg.val_metrics,
                    names=names,
                ),
            ):
                rows[i]["universal"] = res
    return rows


def summarize_validation(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean over clips: `val/loss`, `eval/<metric>` (the model) and `universal/<metric>`, `universal/loss`.
    A metric is averaged over the clips it applies to (PESQ/STOI/CDPAM: speech only); +/-inf values are skipped."""
    out: dict[str, float] = {}
    acc: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        acc["val/loss"].append(r["loss"])
        if "universal_loss" in r:
            acc["universal/loss"].append(r["universal_loss"])
        for prefix, res in (("eval", r["metrics"]), ("universal", r.get("universal", {}))):
            for k, v in res.items():
                if k != "not_applicable" and isinstance(v, (int, float)) and math.isfinite(v):
                    acc[f"{prefix}/{k}"].append(float(v))
    for k, vs in acc.items():
        out[k] = float(np.mean(vs))
    out["val/clips"] = float(len(rows))
    return out


def evaluate_model(
    model: torch.nn.Module,
    segments: np.ndarray,
    kinds: Sequence[str],
    ids: Sequence[str],
    *,
    label: str,
    metrics: Sequence[str] | None = None,
    device: torch.device | None = None,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Paper-table rows (fewsound.tables) for a trained model on stored validation segments [V, L]: the
    deterministic crop of the model's clip length, every metric that applies per kind. One row per clip."""
    from fewsound.metrics import evaluate, to_mlflow

    m = unwrap(model)
    length, sr = m.config.clip_length, m.config.sample_rate
    assert length is not None  # HyperConfig fills it from the preset
    clips = validation_crop(segments, length)
    recs = reconstruct(m, clips, batch_size=batch_size, device=device)
    params = float(m.param_counts()["total"])
    rows: list[dict[str, Any]] = [{} for _ in range(len(clips))]
    for kind in sorted(set(kinds)):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        for i, res in zip(idx, evaluate(clips[idx], recs[idx], sr, kind, metrics, names=[ids[i] for i in idx])):
            rows[i] = {
                "label": label,
                "length": length,
                "clip_id": ids[i],
                "kind": kind,
                **to_mlflow(res),
                "model/params": params,
            }
    return rows
