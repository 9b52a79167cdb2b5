"""The local training loop (one process: tests, benchmarks, a laptop); Ray Train's workers run the same steps
(tune.hyper.worker)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    pass

from fewsound.train.batches import random_batches, validation_crop
from fewsound.train.config import TrainConfig
from fewsound.train.step import EpochStats, make_optimizer, run_epoch
from fewsound.train.validation import choose_validation, summarize_validation, validate


def torch_threads(cpus: float) -> int:
    """Intra-op threads for a worker holding `cpus` logical CPUs (at least 1)."""
    return max(1, int(cpus)) if cpus else max(1, (os.cpu_count() or 1))


def train(
    cfg: TrainConfig,
    train_segments: np.ndarray,
    val_segments: np.ndarray | None = None,
    val_kinds: Sequence[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    on_epoch: Any = None,
) -> tuple[torch.nn.Module, list[EpochStats], list[dict[str, float]]]:
    """Single-process training on in-memory segments (tests, benchmarks, notebooks; the job uses Ray Train).

    Returns (model, per-epoch stats, validation summaries). `on_epoch(stats, summary_or_None)` is called after
    every epoch. `device`: a torch device, or "auto" (CUDA when present); runs at fewsound's numerics (no TF32).
    """
    from fewsound.device import resolve_device
    from fewsound.hyper import build_model

    device = resolve_device(device)  # also fewsound's numerics (no TF32: fewsound.device.set_numerics)
    model = build_model(cfg.model, verbose=False).to(device)
    optimizer, scheduler = make_optimizer(model, cfg)
    length = cfg.model.clip_length
    assert length is not None  # HyperConfig fills it from the preset
    stream = random_batches(train_segments, cfg.batch_size, length, seed=cfg.seed, augment=cfg.augment)
    val = None
    if val_segments is not None and len(val_segments):
        kinds = list(val_kinds or ["speech"] * len(val_segments))
        subset, _ = choose_validation([str(i) for i in range(len(val_segments))], kinds, cfg.val_clips, 0)
        val = (validation_crop(val_segments[subset], length), [kinds[i] for i in subset])
    history, summaries = [], []
    for epoch in range(cfg.epochs):
        stats = run_epoch(model, stream, optimizer, scheduler, cfg, epoch, device=device)
        history.append(stats)
        summary = None
        if val is not None and cfg.is_val_epoch(epoch):
            summary = {"epoch": epoch, **summarize_validation(validate(model, val[0], val[1], cfg, device=device))}
            summaries.append(summary)
        if on_epoch is not None:
            on_epoch(stats, summary)
    return model, history, summaries
