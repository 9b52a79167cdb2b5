"""What a grid trains: its settings (shared by every training and evaluation) and the distinct trainings behind
its cells (cells of the same config and corpus share one)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fewsound.config import override
from fewsound.errors import ConfigError
from fewsound.hyper.catalogue import (
    SMOKE_PRESETS,
    SMOKE_TRAIN,
    Cell,
)


@dataclasses.dataclass
class Settings:
    """What every training and evaluation of a grid shares."""

    train: dict[str, Any]  # TrainConfig fields (epochs, ...) for every training
    overrides: dict[str, Any]  # dotted TrainConfig overrides (--set)
    whisper: dict[str, str]  # Whisper checkpoint folder by size ("tiny.en", "large-v2")
    smoke: bool = False
    experiment: str = "hyper_tables"
    storage: str | None = None
    num_workers: int | None = None
    parallel: int | None = None
    address: str | None = None
    clips: int | None = None
    metrics: list[str] | None = None
    long_seconds: float | None = 10.0
    retries: int = 1  # a failed training is tried again this many times (resuming from its last checkpoint)


def train_config(cell: Cell, s: Settings):
    """The TrainConfig of a cell (raises ConfigError for a Whisper row without a checkpoint)."""
    from fewsound.hyper import HyperConfig
    from fewsound.train import TrainConfig

    size = SMOKE_PRESETS[cell.preset] if s.smoke else {"preset": cell.preset}
    extra = {}
    if cell.whisper:
        if cell.whisper not in s.whisper:
            raise ConfigError("--whisper", f"no checkpoint for {cell.whisper} ({cell.label}): give {cell.whisper}=PATH")
        extra["whisper_checkpoint"] = s.whisper[cell.whisper]
    model = HyperConfig(kind=cell.kind, target=cell.target, encoder=cell.encoder, **size, **extra)
    cfg = TrainConfig(model=model, **{**(SMOKE_TRAIN if s.smoke else {}), **s.train})
    return override(cfg, **s.overrides) if s.overrides else cfg


@dataclasses.dataclass
class Training:
    key: str
    cfg: Any  # TrainConfig
    corpus: str
    cells: list[Cell]
    skip: str | None = None  # why it is not run (a Whisper row without a checkpoint)


def plan(cells: list[Cell], corpora: dict[str, str], s: Settings) -> list[Training]:
    """The distinct trainings behind `cells` (cells of the same config and corpus share one), in cell order."""
    from tune.hyper.train import resolve_train_corpus, run_key

    by_key: dict[str, Training] = {}
    for cell in cells:
        try:
            cfg = train_config(cell, s)
        except ConfigError as e:
            by_key.setdefault(f"skip-{cell.table}-{cell.label}", Training("", None, "", [cell], str(e)))
            continue
        corpus = resolve_train_corpus(corpora[cell.dataset], cfg.model.clip_length)
        key = run_key(cfg, corpus, s.experiment)
        by_key.setdefault(key, Training(key, cfg, corpus, []))
        by_key[key].cells.append(cell)
    return list(by_key.values())
