"""Training FewSound and HyperSound: config, one optimizer step, the epoch loop, validation, training state.

Pure torch, no Ray and no MLflow: the same functions run in one process (tests, benchmarks, a laptop) and inside
every Ray Train worker (tune/hyper/ wraps the model in DDP and feeds the batches from Ray Data).

    cfg = TrainConfig(model=HyperConfig(target="kan", preset="tiny"), epochs=20, samples_per_epoch=64)
    model = build_model(cfg.model); optimizer, scheduler = make_optimizer(model, cfg)
    stream = random_batches(train_segments, cfg.batch_size, cfg.model.clip_length, seed=cfg.seed)
    for epoch in range(cfg.epochs):
        stats = run_epoch(model, stream, optimizer, scheduler, cfg, epoch)
    rows = validate(model, val_clips, val_kinds, cfg)

Decisions (where the paper's text and its code differ, the choice is said):
- The loss is the paper's (fewsound.losses): lambda_t * L1 + lambda_f * multi-resolution mel-STFT, averaged over
  the clips of the (global) batch.
- AdamW (torch's default weight decay 0.01) and OneCycleLR as in the paper's code: `lr` is the code's
  `learning_rate`, the schedule's START rate; the peak is `lr * div_factor` (div_factor 25, pct_start 0.05,
  final rate peak / final_div_factor), planned over epochs * steps_per_epoch steps. Default lr: the paper's text,
  1e-5 (SIREN 1e-6); the code's runs used 5e-5.
- `schedule_step="batch"` (our default) steps the schedule after every optimizer step, i.e. the schedule that
  the code's `steps_per_epoch=625` describes actually happens: warm-up to the peak over the first 5% of all
  steps, then cosine annealing. `"epoch"` steps it once per epoch, which is what the paper's code most likely
  did (Lightning's default interval for a scheduler returned that way): after 2,500 of 1,562,500 planned steps
  the rate has moved from lr to lr * 1.06, i.e. it trained at a practically constant `lr`. Pick "epoch" to
  reproduce that; tests/test_train.py checks both behaviours.
- An epoch is `samples_per_epoch` (10,000) random training clips, not a pass over the corpus (the code's
  RandomSampler(num_samples=10,000)): `steps_per_epoch = samples_per_epoch // batch_size` (drop_last).
  Each clip is a random `clip_length` crop of a stored 65,536-sample segment, peak-normalised after the crop.
- Augmentations of the paper's code (not in its text), off by default: `phase_mangle` (the probability that a
  training crop goes through a random all-pass biquad: pole radius 0.99, pole angle log-uniform in 20-2,000 Hz;
  the code's 0.8) changes the waveform's phase but not its magnitude spectrum; `dequantize_bits` (the code's 16)
  adds uniform noise of one quantisation step, U(-0.5, 0.5) / 2^bits. Both act on the crop before the peak
  normalisation, as the code's transforms do; validation crops are never augmented.
- `batch_size` is the GLOBAL batch: with W data-parallel workers each takes batch_size / W clips, and DDP's
  gradient averaging makes one step equal to one single-process step on the whole batch (tested).
- The delta warm-up lives in the model (HyperConfig.delta_warmup_epochs); the loop calls
  `model.set_epoch(epoch + 1)`: 1-based, as the paper's code counted, so warm-up 50 gives factor 0.02 in the
  first epoch.
- Validation: the deterministic crop (start 0) of a fixed subset of the validation clips (up to `val_clips`,
  512 as in the code, chosen with seed 0); every metric of fewsound.metrics (`val_metrics`, default all) for
  FewSound's reconstructions AND for its universal weights alone (delta = 0): the gap is what the
  hypernetwork contributes.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import pickle
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, cast

import numpy as np
import torch

from fewsound.config import from_dict, to_dict
from fewsound.errors import ConfigError
from fewsound.hyper import HyperConfig
from fewsound.losses import fit_loss

if TYPE_CHECKING:
    from fewsound.hyper.model import _HyperModel

# The paper's rates (its text): 1e-5, SIREN 1e-6 (the code's siren.yaml).
DEFAULT_LR: dict[str, float] = {"nerf": 1e-5, "kan": 1e-5, "siren": 1e-6}
SCHEDULE_STEPS = ("batch", "epoch")
STATE_FILE = "train_state.pt"
STATE_FORMAT = "fewsound.train_state"
META_FILE = "meta.json"
SILENCE_PEAK = 1e-6  # a crop quieter than this is left as is instead of being blown up by peak normalisation


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops (Ray Train's FailureConfig then retries from the last checkpoint)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (with the corpus). Defaults: the paper's (section 1.7)."""

    model: HyperConfig = field(default_factory=lambda: HyperConfig(target="kan"))
    lr: float | None = None  # OneCycle's start rate; None: DEFAULT_LR[model.target]
    schedule_step: str = "batch"  # "batch" | "epoch" (see the module docstring)
    div_factor: float = 25.0  # OneCycle peak = lr * div_factor
    pct_start: float = 0.05
    final_div_factor: float = 1e4
    weight_decay: float = 0.01
    batch_size: int = 16  # global batch (split over the data-parallel workers)
    samples_per_epoch: int = 10_000
    epochs: int = 2_500
    lambda_t: float = 1.0
    lambda_f: float = 1.0
    val_every: int = 3  # epochs between validations (the code's check_val_every_n_epoch); the last is always one
    val_clips: int = 512  # at most this many validation clips (random subset, seed 0), as the code's
    val_metrics: tuple[str, ...] | None = None  # None: every metric of fewsound.metrics
    log_clips: int = 4  # validation clips whose audio and spectrograms are logged
    audio_every: int = 60  # epochs between audio/spectrogram logs (also at the first and last validation)
    seed: int = 0  # data order and crops (the model's init has its own seed: model.seed)
    phase_mangle: float = 0.0  # probability of a random all-pass per training crop (the paper's code: 0.8)
    dequantize_bits: int = 0  # add U(-0.5, 0.5) / 2^bits to training crops; 0 = off (the paper's code: 16)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", from_dict(HyperConfig, self.model, where="model."))
        if self.schedule_step not in SCHEDULE_STEPS:
            raise ConfigError("schedule_step", f"must be one of {list(SCHEDULE_STEPS)}, got {self.schedule_step!r}")
        for name in ("batch_size", "samples_per_epoch", "epochs", "val_every", "audio_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(name, f"must be a positive integer, got {v!r}")
        for name in ("val_clips", "log_clips", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(name, f"must be a non-negative integer, got {v!r}")
        if self.samples_per_epoch < self.batch_size:
            raise ConfigError(
                "samples_per_epoch", f"{self.samples_per_epoch} is less than one batch of {self.batch_size}"
            )
        if not (isinstance(self.phase_mangle, (int, float)) and 0.0 <= self.phase_mangle <= 1.0):
            raise ConfigError("phase_mangle", f"must be a probability in [0, 1], got {self.phase_mangle!r}")
        if (
            not isinstance(self.dequantize_bits, int)
            or isinstance(self.dequantize_bits, bool)
            or not (0 <= self.dequantize_bits <= 32)
        ):
            raise ConfigError(
                "dequantize_bits", f"must be an integer in [0, 32] (0: off), got {self.dequantize_bits!r}"
            )
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("lr", f"must be a positive finite number, got {self.lr!r}")
        if not (0 < self.pct_start < 1):
            raise ConfigError("pct_start", f"must be in (0, 1), got {self.pct_start!r}")
        if self.div_factor < 1 or self.final_div_factor <= 0 or self.weight_decay < 0:
            raise ConfigError(
                "div_factor/final_div_factor/weight_decay",
                f"need div_factor >= 1, final_div_factor > 0, weight_decay >= 0; got "
                f"{self.div_factor}, {self.final_div_factor}, {self.weight_decay}",
            )
        if self.lambda_t < 0 or self.lambda_f < 0 or self.lambda_t + self.lambda_f == 0:
            raise ConfigError(
                "lambda_t/lambda_f", f"need both >= 0 and not both 0, got {self.lambda_t}, {self.lambda_f}"
            )
        if self.val_metrics is not None:
            from fewsound.metrics import EXTRA_METRICS, METRICS

            metrics = tuple(self.val_metrics)
            bad = [m for m in metrics if m not in METRICS + EXTRA_METRICS]
            if bad or not metrics:
                raise ConfigError(
                    "val_metrics", f"unknown metric(s) {bad or metrics}; valid: {METRICS + EXTRA_METRICS}"
                )
            object.__setattr__(self, "val_metrics", metrics)

    @property
    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.model.target]

    @property
    def steps_per_epoch(self) -> int:
        return self.samples_per_epoch // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def is_val_epoch(self, epoch: int) -> bool:
        """epoch: 0-based. Validate every `val_every` epochs (1-based count) and after the last."""
        return (epoch + 1) % self.val_every == 0 or epoch == self.epochs - 1

    @property
    def augment(self) -> "Augment | None":
        """The training-crop augmentation of this config, None when both are off (no random draws then)."""
        if self.phase_mangle == 0 and self.dequantize_bits == 0:
            return None
        return Augment(self.model.sample_rate, self.phase_mangle, self.dequantize_bits)

    def is_audio_epoch(self, epoch: int) -> bool:
        return self.is_val_epoch(epoch) and (
            epoch == self.epochs - 1 or epoch + 1 == self.val_every or (epoch + 1) % self.audio_every == 0
        )


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    return from_dict(TrainConfig, d)


# --------------------------------------------------------------------------------------------- optimisation


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


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Augment:
    """The paper's code's training-crop transforms (see the module docstring): `augment(x, rng)` on crops [b, N]."""

    sample_rate: int
    phase_mangle: float = 0.0  # probability per crop
    dequantize_bits: int = 0  # 0: off
    min_hz: float = 20.0
    max_hz: float = 2_000.0
    pole_radius: float = 0.99

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.phase_mangle > 0:
            x = phase_mangle(
                x,
                rng,
                self.sample_rate,
                p=self.phase_mangle,
                min_hz=self.min_hz,
                max_hz=self.max_hz,
                r=self.pole_radius,
            )
        if self.dequantize_bits > 0:
            x = dequantize(x, rng, self.dequantize_bits)
        return x


def allpass_coefficients(freq_hz: float, sample_rate: int, r: float = 0.99) -> tuple[np.ndarray, np.ndarray]:
    """(b, a) of the second-order all-pass with poles r e^{+-i w}, w = 2 pi freq / sr: |H| = 1 at every frequency
    (the numerator is the reversed denominator), the phase turns by 2 pi around `freq_hz`."""
    c = -2.0 * r * math.cos(2.0 * math.pi * freq_hz / sample_rate)
    return np.array([r * r, c, 1.0]), np.array([1.0, c, r * r])


def phase_mangle(
    x: np.ndarray,
    rng: np.random.Generator,
    sample_rate: int,
    *,
    p: float = 0.8,
    min_hz: float = 20.0,
    max_hz: float = 2_000.0,
    r: float = 0.99,
) -> np.ndarray:
    """Each row of x [b, N] goes, with probability p, through an all-pass biquad whose pole angle is drawn
    log-uniformly in [min_hz, max_hz] -> [b, N] float32 (same magnitude spectrum, another phase)."""
    from scipy.signal import lfilter

    out = np.array(x, dtype=np.float32, copy=True)
    for i in range(len(out)):
        if rng.random() < p:
            freq = math.exp(rng.uniform(math.log(min_hz), math.log(max_hz)))
            b, a = allpass_coefficients(freq, sample_rate, r)
            out[i] = lfilter(b, a, out[i].astype(np.float64)).astype(np.float32)
    return out


def dequantize(x: np.ndarray, rng: np.random.Generator, bits: int = 16) -> np.ndarray:
    """x + U(-0.5, 0.5) / 2^bits: the noise of one `bits`-bit quantisation step (x [b, N] -> [b, N] float32)."""
    noise = (rng.random(np.shape(x)) - 0.5) / float(2**bits)
    return (np.asarray(x, dtype=np.float32) + noise).astype(np.float32)


def crop_batch(
    segments: np.ndarray, length: int, rng: np.random.Generator, augment: Augment | None = None
) -> torch.Tensor:
    """Random `length`-sample crops (uniform start) of stored segments [b, L], augmented when `augment` is given,
    each peak-normalised after that (as the paper's AudioDataset) -> float32 [b, length]."""
    segments = np.asarray(segments, dtype=np.float32)
    assert segments.ndim == 2 and segments.shape[1] >= length, (segments.shape, length)
    starts = rng.integers(0, segments.shape[1] - length + 1, size=len(segments))
    x = np.stack([s[a : a + length] for s, a in zip(segments, starts)])
    if augment is not None:
        x = augment(x, rng)
    return torch.from_numpy(peak_normalize_batch(x))


def peak_normalize_batch(x: np.ndarray) -> np.ndarray:
    """x / max|x| per row; a (near-)silent row is left unscaled rather than amplified to noise."""
    peak = np.abs(x).max(axis=1, keepdims=True)
    return (x / np.where(peak < SILENCE_PEAK, 1.0, peak)).astype(np.float32)


def validation_crop(segments: np.ndarray, length: int) -> np.ndarray:
    """The deterministic validation view: the first `length` samples, peak-normalised. [V, L] -> [V, length]."""
    return peak_normalize_batch(np.asarray(segments, dtype=np.float32)[:, :length])


def random_batches(
    segments: np.ndarray,
    batch_size: int,
    length: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    augment: Augment | None = None,
) -> Iterator[torch.Tensor]:
    """Endless stream of this rank's share of global batches of random crops from in-memory segments [n, L].

    Sampling as the code's RandomSampler(num_samples=...): back-to-back random permutations of the segments.
    Every rank draws the same global batch order (seeded) and takes rows rank::world_size of each batch, so the
    W shares of a step are exactly the global batch one process would see (used by the DDP test and benchmarks;
    the Ray job streams from Ray Data instead).
    """
    assert batch_size % world_size == 0, (batch_size, world_size)
    order_rng = np.random.default_rng([seed, 0])
    crop_rng = np.random.default_rng([seed, 1])
    pool: list[int] = []
    while True:
        while len(pool) < batch_size:
            pool.extend(order_rng.permutation(len(segments)).tolist())
        idx, pool = pool[:batch_size], pool[batch_size:]
        batch = crop_batch(segments[idx], length, crop_rng, augment)
        yield batch[rank::world_size]


# --------------------------------------------------------------------------------------------- validation


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


# --------------------------------------------------------------------------------------------- training state


def state_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> str:
    """sha256 of every tensor of the model and the optimizer and of the scheduler's state: two processes hold
    the same training state iff their digests are equal (the resume test compares them)."""
    h = hashlib.sha256()
    for k, v in sorted(unwrap(model).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    opt = optimizer.state_dict()
    for pid in sorted(opt["state"]):
        for k, v in sorted(opt["state"][pid].items()):
            h.update(f"{pid}.{k}".encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    h.update(json.dumps([g["lr"] for g in opt["param_groups"]]).encode())
    h.update(
        json.dumps(
            {k: v for k, v in scheduler.state_dict().items() if isinstance(v, (int, float, str))}, sort_keys=True
        ).encode()
    )
    return h.hexdigest()


def save_training_state(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainConfig,
    *,
    epoch: int,
    step: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the state after 0-based `epoch` (model, optimizer, scheduler) to `folder`/train_state.pt and a
    readable `folder`/meta.json (epoch, step, digest, config). Returns the meta dict.

    train_state.pt holds only tensors and plain data (dicts, lists, tuples, numbers, strings, None): what
    torch.load(weights_only=True) accepts, so loading it never runs code. The data stream's randomness is no
    state to save: a resumed run derives it from (seed, rank, epoch)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = unwrap(model)
    payload = {
        "format": STATE_FORMAT,
        "model": {k: v.detach().cpu() for k, v in m.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
    }
    _assert_plain(payload, "train_state")
    buf = io.BytesIO()
    torch.save(payload, buf)
    (folder / STATE_FILE).write_bytes(buf.getvalue())
    meta = {
        "epoch": epoch,
        "step": step,
        "digest": state_digest(model, optimizer, scheduler),
        "config": to_dict(cfg),
        **(extra or {}),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def _assert_plain(obj: Any, where: str) -> None:
    """Every leaf of `obj` is a tensor or plain data: a checkpoint that weights_only=True can load (a torch
    upgrade that put an object into an optimizer's or scheduler's state would fail here, when saving)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _assert_plain(k, where)
            _assert_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _assert_plain(v, f"{where}[{i}]")
    elif not (obj is None or torch.is_tensor(obj) or isinstance(obj, (bool, int, float, str))):
        raise TypeError(f"{where} is a {type(obj).__name__}: a training checkpoint holds tensors and plain data only")


def load_state_file(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """The payload of a train_state.pt, read with torch's weights-only unpickler: tensors and plain data only,
    never an object whose unpickling would run code. ConfigError (one line, naming the file) for a file that
    holds anything else or is unreadable. Checkpoints of every fewsound release load (they always held only
    tensors and plain data; the "format" tag is new)."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a pickled Python object ({found.group(1)})" if found else "a pickled Python object"
        raise ConfigError(
            path,
            f"refused: it holds {what}, which could run code when loaded; fewsound's training checkpoints hold "
            "only tensors and plain data, so this file was not written by fewsound or was altered",
        ) from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file is the user's input
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        raise ConfigError(path, f"unreadable training checkpoint ({why})") from None
    if not isinstance(payload, dict) or not {"model", "optimizer", "scheduler", "epoch"} <= payload.keys():
        raise ConfigError(path, "not a fewsound training checkpoint (no model/optimizer/scheduler/epoch)")
    if payload.get("format", STATE_FORMAT) != STATE_FORMAT:
        raise ConfigError(path, f"not a fewsound training checkpoint (format {payload['format']!r})")
    return payload


def load_training_state(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Restore what `save_training_state` wrote into model/optimizer/scheduler (built from the same config).
    Returns the meta dict, with "digest_loaded" = the digest of the restored state."""
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    payload = load_state_file(folder / STATE_FILE, map_location=device)
    unwrap(model).load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    unwrap(model).set_epoch(int(payload["epoch"]) + 1)
    meta["digest_loaded"] = state_digest(model, optimizer, scheduler)
    return meta


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
    every epoch.
    """
    from fewsound.hyper import build_model

    device = torch.device(device)
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


# --------------------------------------------------------------------------------------------- evaluation


def model_from_training_state(folder: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of a training checkpoint folder (train_state.pt + meta.json), in eval mode."""
    from fewsound.hyper import build_model

    folder = Path(folder)
    if not (folder / STATE_FILE).is_file() or not (folder / META_FILE).is_file():
        raise ConfigError(folder, f"not a training checkpoint (no {STATE_FILE} and {META_FILE})")
    cfg = train_config_from_dict(json.loads((folder / META_FILE).read_text())["config"])
    model = build_model(cfg.model, verbose=False)
    payload = load_state_file(folder / STATE_FILE, map_location=map_location)
    model.load_state_dict(payload["model"])
    model.set_epoch(int(payload["epoch"]) + 1)
    return model.to(map_location).eval()


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
