"""Configuration machinery shared by every part of fewsound.

Configs are frozen dataclasses whose defaults are the paper's values. They flatten to dotted keys
(`inr.grid_size`) for MLflow params and Ray Tune's `param_space`, and come back with `from_flat`.
A run is fully determined by its config and seed, so `cfg_hash` names it stably across processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any, TypeVar

from fewsound.errors import ConfigError

C = TypeVar("C")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) of a dataclass config."""
    assert dataclasses.is_dataclass(cfg), type(cfg)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"inr.grid_size": 10, ...}`: one dotted key per leaf field."""
    flat: dict[str, Any] = {}
    for key, value in to_dict(cfg).items():
        _flatten_into(flat, f"{prefix}{key}", value)
    return flat


def _flatten_into(flat: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(flat, f"{key}.{k}", v)
    else:
        flat[key] = value


def from_flat(cls: type[C], flat: dict[str, Any]) -> C:
    """Inverse of `flatten`: build `cls` from dotted keys; unknown keys raise ConfigError."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(cls, nested)


def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Build a (possibly nested) dataclass from a plain dict, coercing lists to tuples."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  (C is a dataclass)
    names = set(fields)
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where or cls.__name__}", f"unknown key(s) {sorted(unknown)}; valid: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = _dataclass_type(cls, fields[name])
        if hint is not None and isinstance(value, dict):
            value = from_dict(hint, value, where=f"{where}{name}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _dataclass_type(cls: type, f: dataclasses.Field) -> type | None:
    """The dataclass type of a nested-config field, from its default (robust to string annotations)."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        probe = f.default_factory()  # type: ignore[misc]
        return type(probe) if dataclasses.is_dataclass(probe) else None
    if dataclasses.is_dataclass(f.default):
        return type(f.default)
    try:
        hint = typing.get_type_hints(cls).get(f.name)
    except NameError:
        return None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def override(cfg: C, **dotted: Any) -> C:
    """Copy of `cfg` with dotted-key overrides: `override(cfg, **{"inr.grid_size": 5})`."""
    flat = flatten(cfg)
    for key in dotted:
        if key not in flat and not any(k.startswith(key + ".") for k in flat):
            raise ConfigError(key, f"not a key of {type(cfg).__name__}; valid: {sorted(flat)}")
    flat.update(dotted)
    return from_flat(type(cfg), flat)


def cfg_hash(cfg: Any, n: int = 8) -> str:
    """Stable short hash of a config (same config -> same hash in every process and machine)."""
    payload = json.dumps(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:n]
