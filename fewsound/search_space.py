"""What a hyper-parameter search of one INR family searches and optimises (pure logic, no Ray): the
define-by-run search spaces (`SPACES`, including what the paper left unstated: FINER k / omega, WIRE omega0 / s0,
RFF sigma), the objective (one metric or a weighted mix, on a common "higher is better" scale) and the
parameter count of a suggestion (for the parameter budget). tune/search/ runs the search on Ray Tune.
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


# --- search spaces (define-by-run) -------------------------------------------------------------------------------
# A family's space is its knobs (KNOBS: the rate and the family's own settings) and its shape (SHAPES: depth and
# the range of hidden widths). Without a budget the widths are sampled one by one (log-uniform); under a budget
# (`suggest_point(..., max_params=...)`) the sampler draws a parameter target between BUDGET_FRACTION of the
# budget and the budget itself, a depth and a taper (the ratio of successive widths), and the widths are derived
# from them: the largest network of that depth and taper within the target. Trials then spend the budget rather
# than landing mostly on tiny networks, as independently sampled widths do.

BUDGET_FRACTION = (0.5, 1.0)  # of --max-params: the range of parameter targets under a budget
TAPER = (0.4, 1.5)  # width[i + 1] / width[i]
MAX_WIDTH = 4096  # the widest layer a budget may derive


def _kan(t):
    t.suggest_float("lr", 1e-3, 3e-2, log=True)
    t.suggest_int("encoding_length", 2, 16)
    t.suggest_int("grid_size", 1, 20)
    t.suggest_int("spline_order", 1, 5)
    t.suggest_categorical("enable_scale_spline", [True, False])


def _nerf(t):
    t.suggest_float("lr", 1e-4, 1e-2, log=True)
    t.suggest_int("encoding_length", 4, 16)


def _siren(t):
    t.suggest_float("lr", 1e-5, 1e-3, log=True)
    t.suggest_float("omega_0", 100.0, 5000.0, log=True)
    t.suggest_float("omega_i", 5.0, 60.0, log=True)


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


def _rff(t):
    t.suggest_float("lr", 1e-4, 1e-2, log=True)
    t.suggest_float("sigma", 10.0, 5000.0, log=True)
    t.suggest_int("num_frequencies", 16, 128, log=True)


KNOBS: dict[str, Callable[[Any], None]] = {
    "kan": _kan,
    "nerf": _nerf,
    "siren": _siren,
    "finer": _finer,
    "wire": _wire,
    "rff": _rff,
}
# family -> (depth range, hidden width range of the unbudgeted space)
SHAPES: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "kan": ((2, 4), (4, 96)),
    **{f: ((2, 6), (16, 192)) for f in ("nerf", "siren", "finer", "wire", "rff")},
}


def _free_widths(t: Any, family: str) -> tuple[int, ...]:
    (d0, d1), (w0, w1) = SHAPES[family]
    return tuple(t.suggest_int(f"width{i}", w0, w1, log=True) for i in range(t.suggest_int("depth", d0, d1)))


def _space(family: str) -> Callable[[Any], None]:
    def space(t: Any) -> None:
        KNOBS[family](t)
        _free_widths(t, family)

    return space


# The unbudgeted space of each family: SPACES[family](optuna_trial) suggests every parameter, widths included.
SPACES: dict[str, Callable[[Any], None]] = {f: _space(f) for f in KNOBS}


def tapered(scale: float, taper: float, depth: int, low: int) -> tuple[int, ...]:
    """Hidden widths round(scale * taper^i), i < depth, none below `low`."""
    return tuple(max(low, round(scale * taper**i)) for i in range(depth))


def fit_widths(family: str, knobs: dict[str, Any], depth: int, taper: float, target: int) -> tuple[int, ...]:
    """The widest `tapered` widths whose network (with `knobs`) has at most `target` parameters (the narrowest
    allowed ones when none fits: the budget check then rejects them). Parameter counts grow with the scale, so a
    bisection over the first width finds it in ~12 counts."""
    low = SHAPES[family][1][0]

    def n(scale: int) -> int:
        return count_params(family, {**knobs, **widths_params(tapered(scale, taper, depth, low))})

    lo, hi = low, MAX_WIDTH
    if n(lo) > target:
        return tapered(lo, taper, depth, low)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if n(mid) <= target else (lo, mid)
    return tapered(lo, taper, depth, low)


def widths_params(widths: tuple[int, ...]) -> dict[str, int]:
    """(48, 24, 12) -> {"depth": 3, "width0": 48, "width1": 24, "width2": 12}: a point's shape."""
    return {"depth": len(widths), **{f"width{i}": int(w) for i, w in enumerate(widths)}}


class _Prefixed:
    """An Optuna trial whose parameter names carry a family prefix ("kan.lr"): a search over several families
    keeps each family's knobs apart (their ranges differ), while "family" itself is one categorical."""

    def __init__(self, trial: Any, prefix: str):
        self.trial, self.prefix = trial, prefix

    def suggest_int(self, name, *args, **kw):
        return self.trial.suggest_int(self.prefix + name, *args, **kw)

    def suggest_float(self, name, *args, **kw):
        return self.trial.suggest_float(self.prefix + name, *args, **kw)

    def suggest_categorical(self, name, choices):
        return self.trial.suggest_categorical(self.prefix + name, choices)


class _Recorder:
    """Wraps a trial and keeps what its suggestions returned under their unprefixed names: the point's knobs."""

    def __init__(self, trial: Any):
        self.trial = trial
        self.values: dict[str, Any] = {}

    def __getattr__(self, method):
        def suggest(name, *args, **kw):
            self.values[name] = value = getattr(self.trial, method)(name, *args, **kw)
            return value

        return suggest


def suggest_point(trial: Any, families: list[str], max_params: int | None = None) -> dict[str, Any]:
    """Define-by-run: one configuration of `families` suggested through `trial` (an Optuna trial, or a stand-in
    answering the suggestions). Returns the point: {"family", knobs..., "depth", "width0", ...}, what is fitted.

    Several families: "family" is a categorical and each family's parameters are prefixed with its name. A budget
    (`max_params`): "param_fraction" (of the budget), "depth" and "taper" are sampled and the widths derived
    (`fit_widths`); they are part of the point, not Optuna parameters.
    """
    family = trial.suggest_categorical("family", list(families)) if len(families) > 1 else families[0]
    t = _Prefixed(trial, f"{family}.") if len(families) > 1 else trial
    rec = _Recorder(t)
    KNOBS[family](rec)
    knobs = dict(rec.values)
    if max_params is None:
        widths = _free_widths(t, family)
    else:
        (d0, d1), _ = SHAPES[family]
        target = int(t.suggest_float("param_fraction", *BUDGET_FRACTION) * max_params)
        depth = t.suggest_int("depth", d0, d1)
        widths = fit_widths(family, knobs, depth, t.suggest_float("taper", *TAPER, log=True), target)
    return {"family": family, **knobs, **widths_params(widths)}


def start_point(family: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The point of the paper's configuration of `family` (its FitConfig defaults), with `overrides` (INR config
    fields, "lr", or "widths" as a tuple): what `--start-from` names. ConfigError on an unknown key."""
    from fewsound.inr import FAMILIES, family_config

    overrides = dict(overrides or {})
    lr = overrides.pop("lr", None)
    cfg = FitConfig(family=family, inr=overrides, lr=None if lr is None else float(lr))
    inr = dataclasses.asdict(family_config(family, **cfg.inr))
    rec = _Recorder(_Answer(inr))
    KNOBS[family](rec)
    fields = {f.name for f in dataclasses.fields(FAMILIES[family].Config)}
    point = {k: v for k, v in cfg.inr.items() if k in fields and k != "widths"}  # knobs outside the space too
    point.update({k: v for k, v in rec.values.items() if k != "lr"})
    return {"family": family, "lr": cfg.resolved_lr, **point, **widths_params(tuple(inr["widths"]))}


class _Answer:
    """A stand-in trial answering each suggestion from `values` (a family's config as a dict)."""

    def __init__(self, values: dict[str, Any]):
        self.values = values

    def suggest_int(self, name, low, high, **_):
        return self.values.get(name, low)

    def suggest_float(self, name, low, high, **_):
        return self.values.get(name, low)

    def suggest_categorical(self, name, choices):
        return self.values.get(name, choices[0])


def encode_point(point: dict[str, Any], families: list[str], max_params: int | None) -> dict[str, Any]:
    """The Optuna parameters that stand for `point` in the space of `families` (for enqueueing a start point, so
    TPE learns from it): its knobs; its widths, or under a budget its parameter fraction, depth and mean taper."""
    family, n = point["family"], count_params(point["family"], point)
    widths = [point[f"width{i}"] for i in range(point["depth"])]
    shape = {"depth": point["depth"]}
    if max_params is None:
        shape.update({f"width{i}": w for i, w in enumerate(widths)})
    else:
        taper = (widths[-1] / widths[0]) ** (1 / (len(widths) - 1)) if len(widths) > 1 else 1.0
        shape.update({"param_fraction": n / max_params, "taper": float(taper)})
    rec = _Recorder(_Answer({}))
    KNOBS[family](rec)
    params = {k: point[k] for k in rec.values if k in point} | shape
    if len(families) > 1:
        return {"family": family, **{f"{family}.{k}": v for k, v in params.items()}}
    return params


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


def parse_families(text: str) -> list[str]:
    """'kan' / 'kan,siren' / 'any' (every family) -> family names (ConfigError naming an unknown one)."""
    names = list(KNOBS) if text.strip() == "any" else [f.strip() for f in text.split(",") if f.strip()]
    for name in names:
        if name not in KNOBS:
            raise ConfigError("--family", f"unknown family {name!r}; valid: any, {', '.join(KNOBS)}")
    if not names:
        raise ConfigError("--family", "no family named")
    return list(dict.fromkeys(names))


def _value(text: str) -> Any:
    """A --start-from value: true/false, an int, a float, widths as 64x32x16, else the text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if "x" in low and all(p.isdigit() for p in low.split("x")):
        return tuple(int(p) for p in low.split("x"))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_start_from(items: list[str]) -> list[dict[str, Any]]:
    """--start-from values -> configurations (overrides of a family's paper configuration). Each item is
    KEY=VALUE,... (e.g. family=kan,grid_size=16,widths=64x32x16,lr=0.004) or a JSON file holding one such object
    or a list of them (widths as a list)."""
    import json
    from pathlib import Path

    out: list[dict[str, Any]] = []
    for item in items:
        if "=" not in item:
            try:
                data = json.loads(Path(item).read_text())
            except (OSError, ValueError) as e:
                raise ConfigError("--start-from", f"{item}: not KEY=VALUE,... nor a readable JSON file ({e})") from None
            for d in data if isinstance(data, list) else [data]:
                if not isinstance(d, dict):
                    raise ConfigError("--start-from", f"{item}: holds {d!r}, not an object of settings")
                out.append({k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
            continue
        conf = {}
        for pair in item.split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ConfigError("--start-from", f"{pair!r} in {item!r} is not KEY=VALUE")
            conf[key.strip()] = _value(value)
        out.append(conf)
    return out
