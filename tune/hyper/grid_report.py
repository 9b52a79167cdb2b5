"""What the grid's parent run gets at the end: each paper table from the trainings' evaluations (mean ± std, the
paper's numbers beside; Markdown, LaTeX, CSV), the long-audio table, and per table a spectrogram grid."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from fewsound.hyper.catalogue import (
    TABLE_ROW_HEADERS,
    Cell,
)
from tune.hyper.grid_plan import Settings, Training


def table_rows(table: int, cells: list[Cell], trainings: list[Training], results: dict) -> list[dict[str, Any]]:
    """The table's per-clip rows, relabelled with the paper's row labels (Table 6: grouped by dataset)."""
    rows = []
    for tr in trainings:
        r = results.get(tr.key)
        for cell in tr.cells:
            if cell.table != table or r is None:
                continue
            rows += [
                {**row, "label": cell.label, "group": cell.group, "run_id": r["run_id"]} for row in r["evaluation"].rows
            ]
    return rows


def long_table_rows(trainings: list[Training], results: dict) -> list[dict[str, Any]]:
    """Every training's long-audio rows, labelled by its first paper row ("T3 KAN, windowed")."""
    rows = []
    for tr in trainings:
        r = results.get(tr.key)
        if r is None:
            continue
        c = tr.cells[0]
        name = f"T{c.table} {c.label}" + (f" ({c.group})" if c.group else "")
        rows += [
            {**row, "label": f"{name}, {row['variant']}", "run_id": r["run_id"]} for row in r["evaluation"].long_rows
        ]
    return rows


def finish_parent(parent, cells, trainings, results, s: Settings, not_run: list[str], failed: list[str]) -> str:
    """Tables and spectrogram grids on the parent run; returns every table as Markdown."""
    from fewsound import tables

    parts = []
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        for table in sorted({c.table for c in cells}):
            mine = [c for c in cells if c.table == table]
            spec = dict(
                title=f"Table {table}: {tables.paper_tables()[table]['caption']}",
                row_header=TABLE_ROW_HEADERS[table],
                paper_table=table,
                label_order=list(dict.fromkeys(c.label for c in mine)),
                keep_empty=True,
                group_order=list(dict.fromkeys(c.group for c in mine if c.group)),
            )
            rows = table_rows(table, cells, trainings, results)
            if not rows:
                parts.append(f"### {spec['title']}\n\n(no finished row)\n")
                continue
            tables.write_results(out / f"table_{table}", rows, **spec)
            parts.append((out / f"table_{table}" / "table.md").read_text())
            _spectrogram_grids(out / "plots", table, mine, trainings, results)
        long_rows = long_table_rows(trainings, results)
        if long_rows:
            spec = dict(title="Long audio: window by window (crossfaded) vs one window", row_header="Model")
            tables.write_results(out / "long_audio", long_rows, **spec)
            parts.append((out / "long_audio" / "table.md").read_text())
        notes = [f"- not run: {x}" for x in not_run] + [f"- failed: {x}" for x in failed]
        markdown = "\n".join(parts) + ("\n" + "\n".join(notes) + "\n" if notes else "")
        (out / "tables.md").write_text(markdown)
        (out / "runs.json").write_text(json.dumps({k: r["run_id"] for k, r in results.items()}, indent=1))
        parent.log_artifact(out, "tables")
    parent.log_metrics(
        {
            "grid/trainings": float(len([t for t in trainings if t.skip is None])),
            "grid/finished": float(len(results)),
            "grid/failed": float(len(failed)),
            "grid/not_run": float(len(not_run)),
        }
    )
    parent.end("FAILED" if failed else "FINISHED")
    return markdown


def _spectrogram_grids(folder: Path, table: int, cells: list[Cell], trainings: list[Training], results: dict) -> None:
    """plots/table_N[_dataset].png: one validation clip's ground truth, then every row's reconstruction of it."""
    from fewsound.report import save_figure, spectrogram_comparison_figure

    of_cell = {(c.table, c.label, c.group): results.get(t.key) for t in trainings for c in t.cells}
    for group in dict.fromkeys(c.group for c in cells):
        preds, ref, clip, sr = {}, None, None, 22_050
        for c in cells:
            r = of_cell.get((c.table, c.label, c.group))
            ev = r["evaluation"] if r else None
            if ev is None or ev.example is None or (ref is not None and ev.example.shape != ref.shape):
                continue
            ref, clip = (ev.example_ref, ev.example_id) if ref is None else (ref, clip)
            preds[c.label] = ev.example
            sr = next(t.cfg.model.sample_rate for t in trainings if t.key == r["key"])
        if ref is None:
            continue
        name = f"table_{table}" + (f"_{group.replace(' ', '_')}" if group else "")
        title = f"Table {table}" + (f" ({group})" if group else "") + f": {clip}"
        save_figure(spectrogram_comparison_figure(ref, preds, sr, title=title), folder / f"{name}.png")
