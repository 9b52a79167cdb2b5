"""Validation: a fixed subset of clips, every metric of FewSound's reconstructions and of its universal weights
alone (the gap is what the hypernetwork contributes); a trained model's evaluation."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from fewsound.losses import ReconstructionLoss
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


@dataclass
class DeviceValidation:
    """What validation computes on the model's device (reconstructions and the paper's loss), before anything
    goes to the CPU. Every tensor lives on the model's device; float32.

    recs: [V, N] the model's reconstructions; losses: [V] their loss against the clips;
    universal: [N] FewSound's universal INR alone (None for HyperSound); universal_losses: [V] (or None).
    """

    recs: torch.Tensor
    losses: torch.Tensor
    universal: torch.Tensor | None
    universal_losses: torch.Tensor | None


@torch.no_grad()
def reconstruct_on_device(
    model: torch.nn.Module,
    clips: np.ndarray | torch.Tensor,
    cfg: TrainConfig | None = None,
    *,
    batch_size: int = 16,
    device: torch.device | None = None,
) -> DeviceValidation:
    """Reconstructions of clips [V, N] and, given `cfg`, their loss (and the universal INR's), all computed on
    `device` (default: the model's) in batches of `batch_size` clips, in eval mode without grad. Nothing is
    copied back to the host: the caller moves what it needs in one transfer. Without `cfg` the losses are empty.
    """
    m = unwrap(model)
    was_training = m.training
    m.eval()
    device = device or next(m.parameters()).device
    x_all = torch.as_tensor(np.ascontiguousarray(clips) if isinstance(clips, np.ndarray) else clips).to(device)
    uni = universal_on_device(m, x_all.shape[1])
    recs, losses, uni_losses = [], [], []
    for i in range(0, len(x_all), batch_size):
        x = x_all[i : i + batch_size]
        rec = m(x).float()
        recs.append(rec)
        if cfg is not None:
            loss = ReconstructionLoss(x, lambda_t=cfg.lambda_t, lambda_f=cfg.lambda_f, sr=cfg.model.sample_rate)
            losses.append(loss(rec))
            if uni is not None:
                uni_losses.append(loss(uni.expand_as(x).contiguous()))
    m.train(was_training)
    empty = x_all.new_zeros((0,), dtype=torch.float32)
    return DeviceValidation(
        recs=torch.cat(recs) if recs else x_all.float(),
        losses=torch.cat(losses) if losses else empty,
        universal=uni,
        universal_losses=(torch.cat(uni_losses) if uni_losses else empty) if uni is not None else None,
    )


@torch.no_grad()
def universal_on_device(model: torch.nn.Module, n_samples: int) -> torch.Tensor | None:
    """FewSound's universal INR alone (delta = 0) on the model's device: float32 [n_samples]; None for
    HyperSound (no universal weights)."""
    m = unwrap(model)
    if m.config.kind != "fewsound":
        return None
    return m.universal(n_samples).float().reshape(-1)


def reconstruct(
    model: torch.nn.Module, clips: np.ndarray, *, batch_size: int = 16, device: torch.device | None = None
) -> np.ndarray:
    """The model's reconstructions of validation clips [V, N] -> [V, N] float32 (eval mode, no grad)."""
    out = reconstruct_on_device(model, clips, batch_size=batch_size, device=device)
    return out.recs.cpu().numpy()


def universal_reconstruction(model: torch.nn.Module, n_samples: int) -> np.ndarray | None:
    """FewSound's universal INR alone (delta = 0): [n_samples]; None for HyperSound (no universal weights)."""
    uni = universal_on_device(model, n_samples)
    return None if uni is None else uni.cpu().numpy()


def validate(
    model: torch.nn.Module,
    clips: np.ndarray,
    kinds: Sequence[str],
    cfg: TrainConfig,
    ids: Sequence[str] | None = None,
    *,
    device: torch.device | None = None,
    workers: int = 0,
) -> list[dict[str, Any]]:
    """Per-clip validation rows for clips [V, N] (already the validation crop): the loss and every metric of
    `cfg.val_metrics` for the model's reconstruction, and (FewSound) for the universal weights alone.

    The reconstructions and the loss run on `device` (default: the model's) and reach the host in one transfer;
    CDPAM runs on that device too. `workers` > 1: the CPU-only per-clip metrics (PESQ, STOI: C and numpy code,
    PESQ's holding the GIL) run in that many processes, alongside the rest; the values are those of
    `workers=0` (in this process), clip for clip.

    Row: {"clip_id", "kind", "loss", "universal_loss", "metrics": {...}, "universal": {...}}.
    """
    clips = np.asarray(clips, dtype=np.float32)
    ids = list(ids) if ids is not None else [f"clip {i}" for i in range(len(clips))]
    on_device = reconstruct_on_device(model, clips, cfg, device=device)
    metric_device = on_device.recs.device
    recs, losses = on_device.recs.cpu().numpy(), on_device.losses.cpu().numpy()
    uni = None if on_device.universal is None else on_device.universal.cpu().numpy()
    rows = [{"clip_id": ids[i], "kind": kinds[i], "loss": float(losses[i]), "metrics": {}} for i in range(len(clips))]
    if on_device.universal_losses is not None:
        for r, ul in zip(rows, on_device.universal_losses.cpu().numpy()):
            r["universal_loss"], r["universal"] = float(ul), {}
    for kind in sorted(set(kinds)):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        targets = [("metrics", recs[idx])]
        if uni is not None:
            targets.append(("universal", np.broadcast_to(uni, (len(idx), uni.shape[0]))))
        for key, pred in targets:
            results = _metrics(clips[idx], pred, cfg, kind, [ids[i] for i in idx], metric_device, workers)
            for i, res in zip(idx, results):
                rows[i][key] = res
    return rows


def _metrics(refs, recs, cfg: TrainConfig, kind: str, names: list[str], device: torch.device, workers: int):
    from fewsound.metrics import evaluate

    return evaluate(
        refs, recs, cfg.model.sample_rate, kind, cfg.val_metrics, names=names, device=device, workers=workers
    )


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
