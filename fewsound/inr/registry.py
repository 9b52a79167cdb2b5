"""The family registry: name -> INR class. Everything that picks a family by name goes through here."""

from __future__ import annotations

import dataclasses
from typing import Any

from fewsound.errors import ConfigError
from fewsound.inr.base import INR
from fewsound.inr.finer import Finer
from fewsound.inr.kan import Kan
from fewsound.inr.nerf import Nerf
from fewsound.inr.rff import Rff
from fewsound.inr.siren import Siren
from fewsound.inr.wire import Wire

# Table 1's order.
FAMILIES: dict[str, type[INR]] = {cls.name: cls for cls in (Nerf, Siren, Finer, Wire, Rff, Kan)}


def family_config(name: str, **overrides: Any):
    """The family's frozen config with `overrides` applied (ConfigError naming a bad family or key)."""
    if name not in FAMILIES:
        raise ConfigError("inr.family", f"unknown INR family {name!r}; known: {list(FAMILIES)}")
    cls = FAMILIES[name].Config
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in overrides:
        if key not in fields:
            raise ConfigError(f"{name}.{key}", f"unknown key; valid keys of {name}: {fields}")
    # Sequences from JSON / Tune / MLflow arrive as lists; configs hold tuples (hashable, frozen).
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return cls(**values)


def build_inr(name_or_config: str | Any, **overrides: Any) -> INR:
    """`build_inr("kan", grid_size=5)` or `build_inr(KanConfig(...))` (a config knows its family)."""
    if isinstance(name_or_config, str):
        cfg = family_config(name_or_config, **overrides)
        return FAMILIES[name_or_config](cfg)
    cfg = name_or_config
    family = getattr(type(cfg), "family", None)
    if family not in FAMILIES or not isinstance(cfg, FAMILIES[family].Config):
        raise ConfigError("inr", f"not an INR config: {cfg!r}")
    if overrides:
        cfg = family_config(family, **{**dataclasses.asdict(cfg), **overrides})  # type: ignore[call-overload]
    return FAMILIES[family](cfg)
