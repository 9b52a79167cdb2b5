"""Named INR configurations of the paper's tables, as small overrides of each family's defaults.

- `table1()`: the six families at the sizes of Table 1 (the INR comparison).
- `kan_ablation()`: the KAN ablation rows of Tables 7-10 and 17 (base: Table 1's KAN with encoding length 8).

Each preset also records the parameter count the paper prints, so `python -m fewsound params` and the tests
can show that our models have exactly those sizes.
"""

from __future__ import annotations

from typing import Any

from fewsound.inr.registry import family_config

_MLP_WIDTHS = (90, 90, 90, 90, 70)

# family -> (overrides of the family's defaults, the paper's count). The defaults already are Table 1's sizes;
# the sizes are spelled out so a preset does not silently change if a default does.
_TABLE1: dict[str, tuple[dict[str, Any], int]] = {
    "nerf": ({"encoding_length": 12, "widths": _MLP_WIDTHS}, 33_261),
    "siren": ({"widths": _MLP_WIDTHS, "omega_0": 2000.0, "omega_i": 30.0}, 31_191),
    "finer": ({"widths": _MLP_WIDTHS}, 31_191),
    "wire": ({"widths": _MLP_WIDTHS}, 31_191),
    "rff": ({"widths": _MLP_WIDTHS, "num_frequencies": 45}, 39_201),
    "kan": ({"encoding_length": 10, "widths": (48, 24, 12), "grid_size": 10, "spline_order": 2}, 33_768),
}

# The ablation base (Section 4.3): encoding length 8, grid 10, order 2, layers [48, 24, 12], scale spline on.
KAN_ABLATION_BASE: dict[str, Any] = {
    "encoding_length": 8,
    "widths": (48, 24, 12),
    "grid_size": 10,
    "spline_order": 2,
    "enable_scale_spline": True,
}

# knob -> (config key, [(value, paper's count)]) in the tables' row order; each table includes the base row.
_KAN_ABLATION: dict[str, tuple[str, list[tuple[Any, int]]]] = {
    "encoding_length": (
        "encoding_length",
        [(2, 23_016), (4, 25_704), (8, 31_080), (10, 33_768), (12, 36_456), (16, 41_832), (24, 52_584)],
    ),
    "layers": (
        "widths",
        [
            ((24, 12, 6), 10_500),
            ((24, 24, 12, 6), 18_564),
            ((48, 12, 6), 19_908),
            ((48, 12, 12, 6), 21_924),
            ((48, 16, 8), 23_408),
            ((48, 24, 12), 31_080),
            ((96, 48, 24), 102_480),
        ],
    ),
    "spline_order": ("spline_order", [(1, 28_860), (2, 31_080), (3, 33_300), (5, 37_740), (7, 42_180)]),
    "grid_size": ("grid_size", [(1, 11_100), (5, 19_980), (10, 31_080), (12, 35_520), (17, 46_620)]),
    "scale_spline": ("enable_scale_spline", [(False, 28_860), (True, 31_080)]),
}


def table1() -> dict[str, dict[str, Any]]:
    """family -> overrides for `build_inr(family, **overrides)` at Table 1's sizes (Table 1's order)."""
    return {family: dict(overrides) for family, (overrides, _) in _TABLE1.items()}


def table1_counts() -> dict[str, int]:
    """family -> the parameter count printed in Table 1 (complex weights count as one)."""
    return {family: count for family, (_, count) in _TABLE1.items()}


def kan_ablation() -> list[tuple[str, Any, dict[str, Any]]]:
    """(knob, value, overrides of the KAN defaults) for every row of the KAN ablation tables."""
    return [(knob, value, overrides) for knob, value, overrides, _ in _kan_rows()]


def kan_ablation_counts() -> list[tuple[str, Any, int]]:
    """(knob, value, the paper's parameter count) in the same order as `kan_ablation()`."""
    return [(knob, value, count) for knob, value, _, count in _kan_rows()]


def _kan_rows():
    for knob, (key, rows) in _KAN_ABLATION.items():
        for value, count in rows:
            overrides = {**KAN_ABLATION_BASE, key: value}
            family_config("kan", **overrides)  # fail at import-time use, not deep in a sweep
            yield knob, value, overrides, count


PRESETS = {"table1": table1, "kan-ablation": kan_ablation}
