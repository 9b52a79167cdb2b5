"""The paper's tables, regenerated from per-fit results: mean ± std per row with the 95% interval of the mean where
a row has several clips (fewsound.stats: Student's t), best in bold, the paper's own numbers side by side, as
Markdown, LaTeX and CSV. A cell reads "2.31 ± 0.40 [2.05, 2.57]": mean ± population std over the clips [95% t
interval of the mean], so that two rows can be compared at a glance (intervals that do not overlap).

Input rows are flat dicts, one per fit, as the sweeps collect them from MLflow:
    {"label": "KAN", "length": 32768, "eval/mse": 8e-4, "eval/psnr": 39.7, ..., "model/params": 33768}
Rows are grouped by clip length (the paper's "1.5 s audio" / "3 s audio" groups) and by label (a family, or an
ablation value such as "grid_size=5"); rows that carry a "group" (Table 6's dataset) are grouped by it first,
and the paper's numbers beside them come from that dataset's group only. The paper's numbers ship with the
package (`paper_tables.json`, a copy of the paper's Tables 1-19 as data).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

# (column title as in the paper, metric key as logged, which direction is better)
COLUMNS: list[tuple[str, str, str]] = [
    ("MSE", "eval/mse", "lower"),
    ("PSNR", "eval/psnr", "higher"),
    ("LSD", "eval/lsd", "lower"),
    ("SI-SNR", "eval/si_snr", "higher"),
    ("PESQ", "eval/pesq", "higher"),
    ("STOI", "eval/stoi", "higher"),
    ("CDPAM", "eval/cdpam", "lower"),
    ("WD", "eval/wd_hf", "lower"),
]
LENGTH_NAMES = {32_768: "1.5 s audio", 65_536: "3 s audio"}
SECONDS = {32_768: 1.5, 65_536: 3.0}
# The paper's datasets (Table 6's group names) by the importer layout of a prepared corpus (its manifest's "layout").
DATASET_NAMES = {
    "vctk": "VCTK",
    "noisy-vctk": "noisy VCTK",
    "librispeech": "LibriSpeech",
    "ljspeech": "LJ Speech",
    "gtzan": "GTZAN",
    "urbansound8k": "UrbanSound8K",
}
ENCODER_LABELS = {"soundstream": "SoundStream", "spectral": "Spectral", "snac": "SNAC"}
# Whisper encoder widths (d_model) of the checkpoints the paper fine-tunes: Table 5's "Whisper T" and "Whisper L".
WHISPER_SIZES = {384: ("Whisper T", "tiny.en"), 1280: ("Whisper L", "large-v2")}


@dataclasses.dataclass
class Row:
    label: str
    n: int
    params: int | None
    values: dict[str, tuple[float, float]]  # column -> (mean, std) over clips
    paper: dict[str, tuple[float, float | None]]  # column -> the paper's (mean, std), where the protocol matches
    # column -> the 95% t interval (low, high) of the mean over clips, where the row has 2 or more clips
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Group:
    name: str
    columns: list[str]
    rows: list[Row]


@dataclasses.dataclass
class Table:
    title: str
    row_header: str
    groups: list[Group]


@functools.lru_cache(maxsize=1)
def paper_tables() -> dict[int, dict]:
    """The paper's Tables 1-19 as data, by table id."""
    data = json.loads((Path(__file__).parent / "paper_tables.json").read_text())
    return {t["id"]: t for t in data["tables"]}


def paper_values(
    table_id: int, label: str, clip_seconds: float | None, group: str | None = None
) -> dict[str, tuple[float, float | None]]:
    """The paper's (mean, std) per column for row `label` of table `table_id` (case-insensitive), or {}.

    group: the dataset of the row, for tables whose groups are datasets (Table 6): only the group of that name
    (case-insensitive) matches, and without a dataset nothing does (the first group would match every dataset).
    """
    table = paper_tables().get(table_id)
    if table is None:
        return {}
    by_dataset = any(g.get("name") and g.get("clip_seconds") is None for g in table["groups"])
    for group_ in table["groups"]:
        if by_dataset and (group is None or str(group_.get("name", "")).lower() != group.lower()):
            continue
        g_sec = group_.get("clip_seconds")
        if clip_seconds is not None and g_sec is not None and abs(float(g_sec) - clip_seconds) > 1e-6:
            continue
        for row in group_["rows"]:
            if str(row["label"]).lower() == label.lower():
                return {c: (v["mean"], v.get("std")) for c, v in row["values"].items()}
    return {}


def whisper_label(checkpoint: str) -> str:
    """Table 5's row label of a Whisper checkpoint: from its config.json's d_model (tiny.en 384, large-v2 1,280),
    else from its folder name ("tiny" / "large"), else "Whisper (NAME)"."""
    path = Path(checkpoint).expanduser()
    config = path / "config.json" if path.is_dir() else path.with_name("config.json")
    try:
        d_model = int(json.loads(config.read_text()).get("d_model", 0))
    except (OSError, ValueError, TypeError):
        d_model = 0
    if d_model in WHISPER_SIZES:
        return WHISPER_SIZES[d_model][0]
    name = path.name.lower()
    for label, size in WHISPER_SIZES.values():
        if size.split(".")[0].split("-")[0] in name:
            return label
    return f"Whisper ({path.name or 'no checkpoint'})"


def hyper_label(cfg: Any, table: int | None) -> str:
    """The row label paper table `table` gives a FewSound/HyperSound model of config `cfg` (fewsound.hyper's
    HyperConfig); table None: a full description."""
    kind = "HyperSound" if cfg.kind == "hypersound" else "FewSound"
    if table == 2:
        return "HyperSound" if cfg.kind == "hypersound" else f"FewSound {cfg.preset}"
    if table in (3, 4, 6):
        return cfg.target.upper()
    if table == 5:
        return whisper_label(cfg.whisper_checkpoint) if cfg.encoder == "whisper" else ENCODER_LABELS[cfg.encoder]
    encoder = whisper_label(cfg.whisper_checkpoint) if cfg.encoder == "whisper" else ENCODER_LABELS[cfg.encoder]
    return f"{kind}-{cfg.target.upper()} {encoder} ({cfg.preset})"


def paper_wd(label: str) -> dict[str, tuple[float, None]]:
    """The paper's Table 11 (WD of each INR on the Table 1 clips, 1.5 s) as {"WD": (value, None)}, or {}."""
    for group in paper_tables().get(11, {}).get("groups", []):
        for row in group["rows"]:
            for name, v in row["values"].items():
                if name.lower() == label.lower():
                    return {"WD": (v["mean"], v.get("std"))}
    return {}


def build_table(
    rows: list[dict[str, Any]],
    *,
    title: str,
    row_header: str = "INR",
    paper_table: int | dict[int, int] | None = None,
    label_order: list[str] | None = None,
    keep_empty: bool = False,
    group_order: list[str] | None = None,
) -> Table:
    """Mean ± std of every metric column present in `rows`, grouped by clip length then label (by "group" first
    where rows carry one: Table 6's datasets).

    paper_table: the paper's table with the same protocol, or {clip length in samples: table id} where the paper
    prints each length in its own table (the ablations: Table 7 for 1.5 s, Table 12 for 3 s).
    keep_empty: every label of `label_order` gets a row in every group, with "-" cells where it has no results
    (a grid's rows that were not run), so the table keeps the paper's shape.
    """
    by_len: dict[tuple[str, int], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_len[(str(r.get("group") or ""), int(r["length"]))][str(r["label"])].append(r)
    rank = {g: i for i, g in enumerate(group_order or [])}
    groups = []
    for dataset, length in sorted(by_len, key=lambda k: (rank.get(k[0], len(rank)), k[0], k[1])):
        labels = by_len[(dataset, length)]
        if keep_empty:
            for lab in label_order or []:
                labels.setdefault(lab, [])
        order = [lab for lab in (label_order or []) if lab in labels] + sorted(set(labels) - set(label_order or []))
        columns = [c for c, key, _ in COLUMNS if any(key in r for lab in labels for r in labels[lab])]
        out_rows = []
        for lab in order:
            clip_rows = labels[lab]
            values, intervals = _column_values(clip_rows)
            params = next((int(r["model/params"]) for r in clip_rows if r.get("model/params") is not None), None)
            table_id = paper_table.get(length) if isinstance(paper_table, dict) else paper_table
            # the paper's numbers only for its own clip lengths (1.5 s / 3 s), never beside e.g. a smoke test's crops
            paper = (
                paper_values(table_id, lab, SECONDS[length], dataset or None) if table_id and length in SECONDS else {}
            )
            if table_id == 1 and length == 32_768:
                paper.update(paper_wd(lab))
            out_rows.append(Row(lab, len(clip_rows), params, values, paper, intervals))
        name = LENGTH_NAMES.get(length, f"{length} samples")
        groups.append(Group(f"{dataset}, {name}" if dataset else name, columns, out_rows))
    return Table(title, row_header, groups)


def _column_values(
    clip_rows: list[dict[str, Any]],
) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
    """({column: (mean, population std)}, {column: 95% t interval of the mean}) over a row's clips (finite
    values only; an interval where there are 2 or more)."""
    from fewsound.stats import mean_interval

    values, intervals = {}, {}
    for c, key, _ in COLUMNS:
        xs = [float(r[key]) for r in clip_rows if key in r and r[key] is not None and math.isfinite(r[key])]
        if xs:
            mean = sum(xs) / len(xs)
            std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))  # population std over clips
            values[c] = (mean, std)
            iv = mean_interval(xs, method="t")
            if iv.low is not None and iv.high is not None:
                intervals[c] = (iv.low, iv.high)
    return values, intervals


def _fmt(column: str, v: float) -> str:
    if column == "MSE" or (v != 0 and abs(v) < 1e-2):
        return f"{v:.1e}"
    return f"{v:.2f}"


def _best(group: Group, column: str) -> str | None:
    better = {c: b for c, _, b in COLUMNS}[column]
    cands = [(r.values[column][0], r.label) for r in group.rows if column in r.values]
    if len(cands) < 2:
        return None
    return (min(cands) if better == "lower" else max(cands))[1]


def _cell(row: Row, column: str, bold: bool, latex: bool) -> str:
    pm = r" $\pm$ " if latex else " ± "
    if column not in row.values:
        text = "-"
    else:
        mean, std = row.values[column]
        text = f"{_fmt(column, mean)}{pm}{_fmt(column, std)}"
        if column in row.intervals:
            low, high = row.intervals[column]
            text += f" [{_fmt(column, low)}, {_fmt(column, high)}]"
    if bold:
        text = rf"\textbf{{{text}}}" if latex else f"**{text}**"
    if column in row.paper:
        pmean, pstd = row.paper[column]
        text += f" ({_fmt(column, pmean)}" + (f"{pm}{_fmt(column, pstd)})" if pstd is not None else ")")
    return text


def to_markdown(table: Table) -> str:
    out = [f"### {table.title}", ""]
    has_paper = any(r.paper for g in table.groups for r in g.rows)
    for g in table.groups:
        note = "mean ± std over the n clips [95% t interval of the mean]" if any(r.intervals for r in g.rows) else ""
        notes = ", ".join(x for x in (note, "paper's value in parentheses" if has_paper else "") if x)
        out += [f"**{g.name}**" + (f" ({notes})" if notes else ""), ""]
        head = [table.row_header, "# params", "n"] + g.columns
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        best = {c: _best(g, c) for c in g.columns}
        for r in g.rows:
            cells = [r.label, f"{r.params:,}" if r.params else "-", str(r.n)]
            cells += [_cell(r, c, best[c] == r.label, latex=False) for c in g.columns]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def to_latex(table: Table) -> str:
    out = []
    for g in table.groups:
        cols = g.columns
        out += [
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{table.title} ({g.name})}}",
            r"\begin{tabular}{l r " + "c " * len(cols) + "}",
            r"\toprule",
            " & ".join([table.row_header, r"\# params"] + cols) + r" \\",
            r"\midrule",
        ]
        best = {c: _best(g, c) for c in cols}
        for r in g.rows:
            cells = [r.label.replace("_", r"\_"), f"{r.params:,}" if r.params else "-"]
            cells += [_cell(dataclasses.replace(r, paper={}), c, best[c] == r.label, latex=True) for c in cols]
            out.append(" & ".join(cells) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "group",
            table.row_header,
            "params",
            "n",
            "metric",
            "mean",
            "std",
            "paper_mean",
            "paper_std",
            "ci_low",
            "ci_high",
        ]
    )
    for g in table.groups:
        for r in g.rows:
            for c in g.columns:
                if c in r.values:
                    pm, ps = r.paper.get(c, (None, None))
                    iv = r.intervals.get(c)
                    w.writerow(
                        [
                            g.name,
                            r.label,
                            r.params or "",
                            r.n,
                            c,
                            repr(r.values[c][0]),
                            repr(r.values[c][1]),
                            "" if pm is None else pm,
                            "" if ps is None else ps,
                            "" if iv is None else repr(iv[0]),
                            "" if iv is None else repr(iv[1]),
                        ]
                    )
    return buf.getvalue()


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """The per-fit results (one line per fit, every column)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in r.items()})
    return buf.getvalue()


def write_results(
    out_dir: Path,
    rows: list[dict[str, Any]],
    *,
    title: str = "Reconstruction metrics",
    row_header: str = "INR",
    paper_table: int | dict[int, int] | None = None,
    label_order: list[str] | None = None,
    **build: Any,
) -> list[Path]:
    """results.csv (per fit) + table.md / table.tex / table.csv (per row) in `out_dir`. Returns the paths.
    `build`: more keyword arguments of `build_table` (keep_empty, group_order)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = build_table(
        rows, title=title, row_header=row_header, paper_table=paper_table, label_order=label_order, **build
    )
    files = {
        "results.csv": rows_to_csv(rows),
        "table.md": to_markdown(table),
        "table.tex": to_latex(table),
        "table.csv": to_csv(table),
    }
    paths = []
    for name, text in files.items():
        (out_dir / name).write_text(text)
        paths.append(out_dir / name)
    return paths


def quality_points(table: Table) -> dict[str, list[tuple[str, int, dict[str, float]]]]:
    """Per group (clip length): (row label, # params, {column: mean}) of every row with a parameter count,
    the input of `fewsound.report.quality_vs_params_figure`."""
    return {
        g.name: [(r.label, r.params, {c: m for c, (m, _) in r.values.items()}) for r in g.rows if r.params]
        for g in table.groups
    }
