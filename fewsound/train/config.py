"""The training config: the paper's hyper-parameters as a frozen dataclass (see fewsound.train for the decisions)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fewsound.config import from_dict
from fewsound.errors import ConfigError
from fewsound.hyper import HyperConfig
from fewsound.train.augment import Augment

if TYPE_CHECKING:
    pass


# The paper's rates (its text): 1e-5, SIREN 1e-6 (the code's siren.yaml).
DEFAULT_LR: dict[str, float] = {"nerf": 1e-5, "kan": 1e-5, "siren": 1e-6}
SCHEDULE_STEPS = ("batch", "epoch")


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
    def augment(self) -> Augment | None:
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
