"""What a hyper-parameter search of one INR family searches and optimises (pure logic, no Ray): the
define-by-run search spaces (`SPACES`, including what the paper left unstated: FINER k / omega, WIRE omega0 / s0,
RFF sigma), the objective (one metric or a weighted mix, on a common "higher is better" scale) and the
parameter count of a suggestion (for the parameter budget). tune/search.py runs the search on Ray Tune.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from fewsound.errors import ConfigError
from fewsound.fit import FitConfig

# Objective = mean over the pack of a per-clip score. Every metric is also put on a common "higher is better,
# about 0..1" scale for the weighted mix: PESQ 1..4.5, PSNR 0..50 dB, SI-SNR 0..30 dB, LSD 4..0.
NORMALIZE: dict[str, Callable[[float], float]] = {
    "pesq": lambda v: (v - 1.0) / 3.5,
    "psnr": lambda v: v / 50.0,
    "si_snr": lambda v: v / 30.0,
    "lsd": lambda v: 1.0 - v / 4.0,
}
MODES = {"pesq": "max", "psnr": "max", "si_snr": "max", "lsd": "min", "mix": "max"}
WORST = {"pesq": 1.0, "psnr": 0.0, "si_snr": -30.0, "lsd": 10.0}  # a metric that does not apply to a clip
DEFAULT_MIX = {"pesq": 0.5, "lsd": 0.25, "si_snr": 0.25}
FINAL_METRICS = ("mse", "psnr", "lsd", "si_snr", "pesq", "stoi")


def parse_weights(text: str | None) -> dict[str, float]:
    """'pesq=0.5,lsd=0.25' -> {"pesq": 0.5, "lsd": 0.25} (ConfigError on unknown names or bad numbers)."""
    if not text:
        return dict(DEFAULT_MIX)
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        try:
            w = float(value)
        except ValueError:
            raise ConfigError("--mix-weights", f"{item!r} is not name=weight") from None
        if name not in NORMALIZE or not math.isfinite(w) or w < 0:
            raise ConfigError("--mix-weights", f"{item!r}: names are {', '.join(NORMALIZE)}, weights >= 0")
        out[name] = w
    if not sum(out.values()) > 0:
        raise ConfigError("--mix-weights", "at least one weight must be positive")
    return out


def objective_metrics(objective: str, weights: dict[str, float]) -> list[str]:
    if objective not in MODES:
        raise ConfigError("--objective", f"unknown objective {objective!r}; valid: {', '.join(MODES)}")
    return [m for m, w in weights.items() if w > 0] if objective == "mix" else [objective]


def score(objective: str, weights: dict[str, float], row: dict[str, Any]) -> float:
    """One clip's objective from its evaluate() row (a metric that does not apply counts as WORST)."""

    def value(m: str) -> float:
        v = row.get(m)
        return float(v) if v is not None and math.isfinite(v) else WORST[m]

    if objective == "mix":
        return sum(w * NORMALIZE[m](value(m)) for m, w in weights.items()) / sum(weights.values())
    return value(objective)


# --- search spaces (define-by-run: depth decides how many widths exist) ----------------------------------------


def _widths(trial: Any, depth: tuple[int, int], width: tuple[int, int]) -> None:
    n = trial.suggest_int("depth", *depth)
    for i in range(n):
        trial.suggest_int(f"width{i}", *width, log=True)


def _kan(t):
    t.suggest_float("lr", 1e-3, 3e-2, log=True)
    t.suggest_int("encoding_length", 2, 16)
    t.suggest_int("grid_size", 1, 20)
    t.suggest_int("spline_order", 1, 5)
    t.suggest_categorical("enable_scale_spline", [True, False])
    _widths(t, (2, 4), (4, 96))


def _nerf(t):
    t.suggest_float("lr", 1e-4, 1e-2, log=True)
    t.suggest_int("encoding_length", 4, 16)
    _widths(t, (2, 6), (16, 192))


def _siren(t):
    t.suggest_float("lr", 1e-5, 1e-3, log=True)
    t.suggest_float("omega_0", 100.0, 5000.0, log=True)
    t.suggest_float("omega_i", 5.0, 60.0, log=True)
    _widths(t, (2, 6), (16, 192))


def _finer(t):
    _siren(t)
    t.suggest_float("first_bias_scale", 0.01, 20.0, log=True)  # FINER's k


def _wire(t):
    t.suggest_float("lr", 1e-4, 1e-2, log=True)
    t.suggest_float("omega_0", 100.0, 5000.0, log=True)
    # a hidden Gabor unit's magnitude can reach exp(omega_i^2 / (4 s0^2)): s0 above ~1 zeroes the units and
    # omega_i above ~2 s0 explodes them (fewsound/inr/wire.py), so the space centres on the defaults 1 / 0.5
    t.suggest_float("omega_i", 0.25, 4.0, log=True)
    t.suggest_float("s0", 0.1, 2.0, log=True)
    _widths(t, (2, 6), (16, 192))


def _rff(t):
    t.suggest_float("lr", 1e-4, 1e-2, log=True)
    t.suggest_float("sigma", 10.0, 5000.0, log=True)
    t.suggest_int("num_frequencies", 16, 128, log=True)
    _widths(t, (2, 6), (16, 192))


SPACES: dict[str, Callable[[Any], None]] = {
    "kan": _kan,
    "nerf": _nerf,
    "siren": _siren,
    "finer": _finer,
    "wire": _wire,
    "rff": _rff,
}


def to_fit_config(family: str, params: dict[str, Any], steps: int, seed: int = 0, **fit: Any) -> FitConfig:
    """A suggestion (flat Optuna params) -> the FitConfig it stands for."""
    from fewsound.inr import FAMILIES

    fields = {f.name for f in dataclasses.fields(FAMILIES[family].Config)}
    inr = {k: v for k, v in params.items() if k in fields}
    if "depth" in params:
        inr["widths"] = tuple(int(params[f"width{i}"]) for i in range(int(params["depth"])))
    return FitConfig(family=family, inr=inr, lr=params.get("lr"), steps=steps, seed=seed, **fit)


def count_params(family: str, params: dict[str, Any]) -> int:
    return to_fit_config(family, params, 1).build_inr().num_params()


class _Smallest:
    """A stand-in Optuna trial answering every suggestion with its smallest value (the last choice of a
    categorical, listed largest first): the space's smallest configuration, to check a budget up front."""

    def __init__(self):
        self.params: dict[str, Any] = {}

    def suggest_int(self, name, low, high, **_):
        return self.params.setdefault(name, low)

    def suggest_float(self, name, low, high, **_):
        return self.params.setdefault(name, low)

    def suggest_categorical(self, name, choices):
        return self.params.setdefault(name, choices[-1])


def smallest_params(family: str) -> int:
    trial = _Smallest()
    SPACES[family](trial)
    return count_params(family, trial.params)
