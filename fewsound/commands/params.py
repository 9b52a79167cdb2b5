"""`python -m fewsound params --preset table1|kan-ablation`: parameter counts of the paper's INR configs.

Prints one row per model: our count (complex weights counting as one, as the paper counts), the real-float
count where it differs (WIRE), and the count the paper prints, with a mark where they disagree.
"""

from __future__ import annotations

import argparse
import json

from fewsound.inr import build_inr, presets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(presets.PRESETS), default="table1", help="which table's models")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")


def rows(preset: str) -> list[dict]:
    out = []
    if preset == "table1":
        counts = presets.table1_counts()
        for family, overrides in presets.table1().items():
            inr = build_inr(family, **overrides)
            out.append(_row(family, family, "", inr, counts[family], overrides))
    else:
        for (knob, value, overrides), (_, _, paper) in zip(presets.kan_ablation(), presets.kan_ablation_counts()):
            inr = build_inr("kan", **overrides)
            out.append(_row(f"kan {knob}={_fmt(value)}", "kan", knob, inr, paper, overrides))
    return out


def _row(label, family, knob, inr, paper, overrides) -> dict:
    return {
        "model": label,
        "family": family,
        "knob": knob,
        "params": inr.num_params(),
        "real_params": inr.num_real_params(),
        "paper_params": paper,
        "matches_paper": inr.num_params() == paper,
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
    }


def _fmt(value) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value)


def run(args: argparse.Namespace) -> int:
    table = rows(args.preset)
    if args.json:
        print(json.dumps(table, indent=1))
    else:
        width = max(len(r["model"]) for r in table)
        print(f"{'model':<{width}}  {'params':>9}  {'paper':>9}  note")
        for r in table:
            notes = []
            if r["real_params"] != r["params"]:
                notes.append(f"{r['real_params']:,} real floats (complex weights count as one)")
            if not r["matches_paper"]:
                notes.append("DIFFERS FROM PAPER")
            print(f"{r['model']:<{width}}  {r['params']:>9,}  {r['paper_params']:>9,}  {'; '.join(notes)}")
    return 0 if all(r["matches_paper"] for r in table) else 1
