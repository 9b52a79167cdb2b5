"""One optimizer step and the epoch loop: AdamW + OneCycleLR, the paper's loss over the global batch."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, cast

import numpy as np
import torch

from fewsound.losses import fit_loss

if TYPE_CHECKING:
    from fewsound.hyper.model import _HyperModel

from fewsound.train.config import TrainConfig, TrainingDiverged


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW over every trainable parameter and the OneCycle schedule of `cfg` -> (optimizer, scheduler)."""
    lr = cfg.resolved_lr
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=cfg.weight_decay
    )
    # "epoch" plans the schedule over epochs * steps_per_epoch steps but takes one per epoch, as the paper's code.
    total = cfg.total_steps
    if total < 4:  # too short for a cycle (OneCycleLR would start at its final rate): constant start rate
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    # Short runs (smoke tests): at least 2 warm-up steps, else torch's phase boundaries collapse.
    pct = cfg.pct_start if cfg.pct_start * total >= 2 else min(0.5, 2 / total)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=lr * cfg.div_factor,
        total_steps=total,
        pct_start=pct,
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
    )
    return optimizer, scheduler


def unwrap(model: torch.nn.Module) -> _HyperModel:
    """The FewSound/HyperSound module inside a DDP wrapper (or the module itself)."""
    return cast("_HyperModel", getattr(model, "module", model))


def train_step(
    model: torch.nn.Module,
    batch: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    lambda_t: float = 1.0,
    lambda_f: float = 1.0,
    sample_rate: int = 22_050,
    scheduler: Any = None,
) -> torch.Tensor:
    """One optimizer step on `batch` [b, N] (b: this process's share of the global batch). Returns the per-clip
    losses [b] (detached). The loss is the batch MEAN, so DDP's gradient averaging over W workers with b = B / W
    clips each equals one step on all B clips. `scheduler`: stepped after the update (schedule_step="batch")."""
    assert batch.dim() == 2, f"batch must be [b, N], got {tuple(batch.shape)}"
    model.train()
    recon = model(batch)
    per_clip = fit_loss(recon, batch, lambda_t=lambda_t, lambda_f=lambda_f, sr=sample_rate)  # [b]
    loss = per_clip.mean()
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"non-finite training loss {float(loss)}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return per_clip.detach()


@dataclass
class EpochStats:
    epoch: int
    losses: list[float]  # mean loss of each step (this process's share of the batch)
    lr: float  # the rate of the epoch's last step
    seconds: float
    samples: int  # clips this process trained on

    @property
    def loss(self) -> float:
        return float(np.mean(self.losses))


def run_epoch(
    model: torch.nn.Module,
    batches: Iterator[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainConfig,
    epoch: int,
    *,
    device: torch.device | None = None,
    on_step: Any = None,
) -> EpochStats:
    """`cfg.steps_per_epoch` steps on batches drawn from `batches` (an endless iterator of [b, N] tensors).
    `on_step(steps_done_in_epoch, samples_done_in_epoch, seconds_since_epoch_start)` after every step (progress)."""
    unwrap(model).set_epoch(epoch + 1)  # 1-based, as the paper's code (delta warm-up factor epoch / w)
    per_batch = scheduler if cfg.schedule_step == "batch" else None
    losses, samples, t0 = [], 0, time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    for batch in itertools.islice(batches, cfg.steps_per_epoch):
        if device is not None:
            batch = batch.to(device, non_blocking=True)
        lr = optimizer.param_groups[0]["lr"]
        per_clip = train_step(
            model,
            batch,
            optimizer,
            lambda_t=cfg.lambda_t,
            lambda_f=cfg.lambda_f,
            sample_rate=cfg.model.sample_rate,
            scheduler=per_batch,
        )
        losses.append(float(per_clip.mean()))
        samples += batch.shape[0]
        if on_step is not None:
            on_step(len(losses), samples, time.perf_counter() - t0)
    if len(losses) != cfg.steps_per_epoch:
        raise RuntimeError(f"the batch stream ended after {len(losses)} of {cfg.steps_per_epoch} steps")
    if cfg.schedule_step == "epoch":
        scheduler.step()
    return EpochStats(epoch, losses, lr, time.perf_counter() - t0, samples)
