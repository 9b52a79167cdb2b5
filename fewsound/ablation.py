"""The KAN ablation (the paper's Tables 7-10 and 12-17): one knob at a time around a base configuration.

    tasks, index = ablation_tasks(knobs, clips, lengths, steps=...)   # the distinct fits of the sweep
    tables = knob_tables(rows)                                          # one paper-style table per knob

The base (encoding length 8, grid 10, order 2, layers [48, 24, 12], lr 5e-3, scale_spline on: 31,080 params)
appears once in every knob's table but is fitted once: rows are fits of *distinct* configurations, and a fit's
knob rows are derived from its label (`"base"` or `"grid_size=5"`), so the report job regenerates the same
tables from the MLflow child runs alone.

Row labels in the per-knob tables are the ablation values exactly as the paper prints them ('2', '[24, 12, 6]',
'0.005', 'False'), so `fewsound.tables` finds the paper's numbers side by side (Table 7 for 1.5 s, Table 12 for
3 s, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fewsound.errors import ConfigError
from fewsound.fit import FitConfig

BASE_INR: dict[str, Any] = {
    "encoding_length": 8,
    "widths": (48, 24, 12),
    "grid_size": 10,
    "spline_order": 2,
    "enable_scale_spline": True,
}
BASE_LR = 5e-3
BASE_LABEL = "base"


@dataclasses.dataclass(frozen=True)
class Knob:
    name: str  # what --knobs takes
    field: str  # KanConfig field, or "lr" (FitConfig.lr)
    values: tuple[Any, ...]  # the paper's rows, in its order
    base: Any  # the base configuration's value
    title: str
    row_header: str
    paper_tables: dict[int, int]  # clip length (samples) -> the paper's table id

    def label(self, value: Any) -> str:
        """The value as the paper prints it."""
        if isinstance(value, tuple):
            return str(list(value))
        return str(value)

    def fit_config(self, value: Any, steps: int, seed: int) -> FitConfig:
        inr = dict(BASE_INR)
        lr = BASE_LR
        if self.field == "lr":
            lr = value
        else:
            inr[self.field] = value
        return FitConfig(family="kan", inr=inr, lr=lr, steps=steps, seed=seed)


_1_5, _3 = 32_768, 65_536
KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob(
            "encoding_length",
            "encoding_length",
            (2, 4, 8, 10, 12, 16, 24),
            8,
            "KAN: encoding length",
            "Enc. Len.",
            {_1_5: 7, _3: 12},
        ),
        Knob(
            "layers",
            "widths",
            ((24, 12, 6), (24, 24, 12, 6), (48, 12, 6), (48, 12, 12, 6), (48, 16, 8), (48, 24, 12), (96, 48, 24)),
            (48, 24, 12),
            "KAN: number and sizes of hidden layers",
            "Layer Sizes",
            {_1_5: 8, _3: 13},
        ),
        Knob(
            "spline_order", "spline_order", (1, 2, 3, 5, 7), 2, "KAN: spline order", "Spline Order", {_1_5: 9, _3: 14}
        ),
        Knob("grid_size", "grid_size", (1, 5, 10, 12, 17), 10, "KAN: grid size", "Grid Size", {_1_5: 10, _3: 15}),
        Knob(
            "lr",
            "lr",
            (0.01, 0.007, 0.006, 0.005, 0.001),
            BASE_LR,
            "KAN: learning rate",
            "Learning Rate",
            {_1_5: 16, _3: 16},
        ),
        Knob(
            "scale_spline",
            "enable_scale_spline",
            (False, True),
            True,
            "KAN: scale spline",
            "Scale Spline",
            {_1_5: 17, _3: 17},
        ),
    )
}


def parse_knobs(text: str | None) -> list[Knob]:
    if text is None:
        return list(KNOBS.values())
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in KNOBS]
    if bad or not names:
        raise ConfigError("--knobs", f"unknown knob(s) {bad or [text]}; valid: {', '.join(KNOBS)}")
    return [KNOBS[n] for n in dict.fromkeys(names)]


def run_label(knob: Knob, value: Any) -> str:
    """The child run's label: 'base' for the base configuration, else 'knob=value'."""
    return BASE_LABEL if value == knob.base else f"{knob.name}={knob.label(value)}"


def configs(knobs: list[Knob], steps: int, seed: int = 0) -> dict[str, FitConfig]:
    """run label -> its FitConfig, one per distinct configuration of the chosen knobs (the base once)."""
    out: dict[str, FitConfig] = {}
    for knob in knobs:
        for value in knob.values:
            out.setdefault(run_label(knob, value), knob.fit_config(value, steps, seed))
    return out


def knob_rows(label: str, knobs: list[Knob] | None = None) -> list[tuple[Knob, str]]:
    """Which knob tables a fit with run label `label` belongs to, with its row label there."""
    knobs = knobs or list(KNOBS.values())
    if label == BASE_LABEL:
        return [(k, k.label(k.base)) for k in knobs]
    name, _, value = label.partition("=")
    return [(k, value) for k in knobs if k.name == name]


def paper_params(knob: Knob, row_label: str) -> int | None:
    """The paper's parameter count of a row (from its 1.5 s table)."""
    from fewsound.tables import paper_tables

    table = paper_tables().get(knob.paper_tables[_1_5], {})
    for group in table.get("groups", []):
        for row in group["rows"]:
            if str(row["label"]) == row_label:
                return row.get("params")
    return None


def check_param_counts(knobs: list[Knob]) -> list[str]:
    """Our INR's parameter count of every row against the paper's; returns the mismatches (empty: all equal)."""
    bad = []
    for knob in knobs:
        for value in knob.values:
            ours = knob.fit_config(value, 1, 0).build_inr().num_params()
            theirs = paper_params(knob, knob.label(value))
            if theirs is not None and ours != theirs:
                bad.append(f"{knob.name}={knob.label(value)}: {ours:,} params, the paper has {theirs:,}")
    return bad


def knob_tables(rows: list[dict[str, Any]], knobs: list[Knob] | None = None) -> dict[str, dict[str, Any]]:
    """knob name -> {"rows": per-fit rows relabelled with the paper's row labels, "table": build_table kwargs}.

    rows: per-fit dicts with at least `label` (the run label) and `length` (as run_sweep and the report job
    collect them). Knobs the sweep did not vary (no row but the base's) are left out.
    """
    out: dict[str, dict[str, Any]] = {}
    for knob in knobs or list(KNOBS.values()):
        if not any(str(r["label"]).startswith(f"{knob.name}=") for r in rows):
            continue  # only the base: this knob was not part of the sweep
        mine = [dict(r, label=row_label) for r in rows for k, row_label in knob_rows(str(r["label"]), [knob])]
        if mine:
            ids = "/".join(str(t) for t in sorted(set(knob.paper_tables.values())))
            out[knob.name] = {
                "rows": mine,
                "table": {
                    "title": f"{knob.title} (paper Table{'s' if '/' in ids else ''} {ids})",
                    "row_header": knob.row_header,
                    "paper_table": dict(knob.paper_tables),
                    "label_order": [knob.label(v) for v in knob.values],
                },
            }
    return out


def write_ablation_report(out_dir, rows: list[dict[str, Any]], knobs: list[Knob] | None = None):
    """Per knob: `<knob>/table.{md,tex,csv}` + `results.csv`; and `quality_vs_params.png` (PSNR and PESQ against
    # params, one point per row, a series per knob and clip length). Returns (paths, the tables as Markdown)."""
    from pathlib import Path

    from fewsound import tables
    from fewsound.report import quality_vs_params_figure, save_figure

    out_dir = Path(out_dir)
    paths, markdown, series = [], [], {}
    for name, kt in knob_tables(rows, knobs).items():
        paths += tables.write_results(out_dir / name, kt["rows"], **kt["table"])
        markdown.append((out_dir / name / "table.md").read_text())
        table = tables.build_table(kt["rows"], **kt["table"])
        for group, points in tables.quality_points(table).items():
            series[f"{name}, {group.replace(' audio', '')}"] = points
    if series:
        fig = quality_vs_params_figure(series, title="KAN ablation: quality vs parameter count")
        paths.append(save_figure(fig, out_dir / "quality_vs_params.png"))
    return paths, "\n".join(markdown)
