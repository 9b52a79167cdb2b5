"""A sweep's summary runs and its links into MLflow's UI.

Summary runs are what MLflow's UI shows of a sweep of thousands of fits without scrolling through them: one run per
table row (group x label), named "summary: KAN 1.5 s audio", in the companion experiment "<experiment> summary"
(summary_experiment), so that the fits' experiment keeps one parent and its fits (every tool and test that lists a
parent's children sees fits only) while the summary experiment opens on a handful of rows. Each carries the row's
statistics as metrics, per paper metric (fewsound.tables.COLUMNS, e.g. eval/pesq):
    eval/pesq/mean, eval/pesq/std (population, over clips), eval/pesq/ci95_low, eval/pesq/ci95_high (Student's t
    interval of the mean, rows of 2 or more clips), eval/pesq/n (clips in the row); model/params
the row as Markdown in its description with a link to the row's fits (best first) in the fits' experiment and its
BEST_FITS best fits ranked here (MLflow's own sort of thousands of runs by a metric is slow), and
tags: fewsound.role = summary, fewsound.summary (the row), fewsound.sweep, fewsound.sweep_parent (the parent run).
They are the table's own numbers (fewsound.tables.build_table, computed once for the plot and the summaries),
logged once and, when the sweep runs again, updated in place where a row changed: one search, then requests only
for rows that changed. The parent run's description and the sweep's last lines give the summary experiment's page
(sorted by a metric's mean: the best configuration first) and the fits' page sorted by the metric (the best fits).
"""

from __future__ import annotations

import math
import time
from typing import Any

from fewsound.tracking import PARENT_TAG, MlflowRun, ui_url
from tune.spine import (
    LABEL_TAG,
    NOTE_TAG,
    ROLE_TAG,
    SUMMARY_ROLE,
    SUMMARY_TAG,
    SWEEP_PARENT_TAG,
    SWEEP_TAG,
    search_runs,
    tag_filter,
)
from tune.sweep.result import SweepSummary, runs_page_url

SUMMARY_FILTER = tag_filter(ROLE_TAG, SUMMARY_ROLE)


def summary_experiment(experiment: str) -> str:
    """The experiment of the summary runs of a sweep logged to `experiment`."""
    return f"{experiment} summary"


def summary_metrics(row: Any) -> dict[str, float]:
    """A table row's (fewsound.tables.Row) statistics as summary-run metrics: {metric key/stat: value}."""
    from fewsound.tables import COLUMNS

    out: dict[str, float] = {}
    for column, key, _ in COLUMNS:
        if column not in row.values:
            continue
        mean, std = row.values[column]
        out.update({f"{key}/mean": mean, f"{key}/std": std, f"{key}/n": float(row.n)})
        if column in row.intervals:
            out[f"{key}/ci95_low"], out[f"{key}/ci95_high"] = row.intervals[column]
    if row.params is not None:
        out["model/params"] = float(row.params)
    return out


def log_summary_runs(parent: MlflowRun, s: SweepSummary, table: Any) -> tuple[str, dict[str, str]]:
    """One FINISHED run per row of `table` (fewsound.tables.Table) of sweep `s` in summary_experiment(s.experiment),
    created where missing and updated where its numbers changed; summary runs of rows no longer in the table are
    deleted. One search, then requests only for rows that changed. Returns (the summary experiment's id,
    {row "<group> | <label>": its run id})."""
    from mlflow.entities import Metric, RunTag

    from fewsound.tracking import get_or_create_experiment

    client = parent.client
    exp_id = get_or_create_experiment(client, summary_experiment(s.experiment))
    where = f"{tag_filter(SWEEP_PARENT_TAG, parent.run_id)} and {SUMMARY_FILTER}"
    existing: dict[str, Any] = {}
    for r in search_runs(client, exp_id, where, order_by=["attributes.start_time DESC"]):
        if r.data.tags.get(SUMMARY_TAG) in existing:  # two drivers raced: keep the newest
            client.delete_run(r.info.run_id)
        else:
            existing[r.data.tags.get(SUMMARY_TAG, "")] = r
    out = {}
    for group in table.groups:
        for row in group.rows:
            key, metrics, note = f"{group.name} | {row.label}", summary_metrics(row), _row_note(s, group.name, row)
            run = existing.pop(key, None)
            if run is None:
                tags = {ROLE_TAG: SUMMARY_ROLE, SUMMARY_TAG: key, SWEEP_TAG: s.sweep, SWEEP_PARENT_TAG: parent.run_id}
                run = client.create_run(exp_id, run_name=f"summary: {row.label} {group.name}", tags=tags)
            elif run.data.tags.get(NOTE_TAG) == note and _same(run.data.metrics, metrics):
                out[key] = run.info.run_id
                continue
            now = int(time.time() * 1000)
            batch = [Metric(k, v, now, 0) for k, v in metrics.items()]
            client.log_batch(
                run.info.run_id, metrics=batch, tags=[RunTag(NOTE_TAG, note), RunTag(LABEL_TAG, row.label)]
            )
            client.set_terminated(run.info.run_id, status="FINISHED")
            out[key] = run.info.run_id
    for stale in existing.values():  # rows that left the table
        client.delete_run(stale.info.run_id)
    return exp_id, out


def _row_note(s: SweepSummary, group: str, row: Any) -> str:
    """A row as its summary run's description (Markdown): its statistics and a link to its fits, best first."""
    from fewsound.tables import COLUMNS

    lines = [f"**{row.label}, {group}**: mean over {row.n} clips", "", "| metric | mean | std | 95% interval |"]
    lines.append("|---|---|---|---|")
    for column, _, better in COLUMNS:
        if column in row.values:
            (mean, std), iv = row.values[column], row.intervals.get(column)
            interval = f"[{iv[0]:.4g}, {iv[1]:.4g}]" if iv else "- (one clip)"
            lines.append(f"| {column} ({better} is better) | {mean:.4g} | {std:.4g} | {interval} |")
    where = f"{tag_filter(PARENT_TAG, s.parent_run_id)} and {tag_filter(LABEL_TAG, row.label)}"
    length = _group_length(group)
    if length is not None:
        where += f" and params.`clip.length` = '{length}'"
    metric = headline_metric(s.rows)
    lines += [
        "",
        f"[The fits of this row]({runs_page_url(s.ui_url, where, metric)})"
        + (f", best {metric} first" if metric else ""),
    ]
    if metric:  # ranked here, from the rows in hand: MLflow sorts thousands of runs by a metric slowly
        lines += ["", f"Best fits by {metric}:"] + [
            f"{i}. [{r.get('key', r.get('clip_id'))}]({ui_url(s.tracking_uri, s.experiment_id, r.get('run_id'))}) "
            f"{r[metric]:.4g}"
            for i, r in enumerate(best_fits(_fits_of(s.rows, group, row.label), metric, BEST_FITS), 1)
        ]
    return "\n".join(lines)


BEST_FITS = 5  # fits listed, best first, in each summary run's description


def best_fits(rows: list[dict[str, Any]], metric: str, k: int) -> list[dict[str, Any]]:
    """The `k` fits of `rows` best by `metric` (fewsound.tables.COLUMNS' direction), best first."""
    import heapq

    from fewsound.tables import COLUMNS

    lower = any(key == metric and better == "lower" for _, key, better in COLUMNS)
    have = [r for r in rows if isinstance(r.get(metric), float) and math.isfinite(r[metric])]
    return heapq.nsmallest(k, have, key=lambda r: r[metric] if lower else -r[metric])


def _fits_of(rows: list[dict[str, Any]], group: str, label: str) -> list[dict[str, Any]]:
    """The fits in table row (`group`, `label`): its label, its group's clip length and dataset (fewsound.tables)."""
    length, dataset = _group_length(group), group.rsplit(", ", 1)[0] if ", " in group else ""
    return [
        r
        for r in rows
        if str(r["label"]) == label and int(r["length"]) == length and str(r.get("group") or "") == dataset
    ]


def _group_length(group: str) -> int | None:
    """The clip length (samples) of a table group's name (fewsound.tables: "1.5 s audio", "4096 samples", a
    dataset's "VCTK, 1.5 s audio"), or None."""
    from fewsound.tables import LENGTH_NAMES

    name = group.rsplit(", ", 1)[-1]
    by_name = {v: k for k, v in LENGTH_NAMES.items()}
    if name in by_name:
        return by_name[name]
    n = name.removesuffix(" samples")
    return int(n) if n.isdigit() else None


def headline_metric(rows: list[dict[str, Any]]) -> str | None:
    """The metric the sweep's UI links sort by: PESQ, else SI-SNR, PSNR, else the first paper metric the rows have."""
    from fewsound.tables import COLUMNS

    keys = ["eval/pesq", "eval/si_snr", "eval/psnr"] + [key for _, key, _ in COLUMNS]
    return next((key for key in keys if rows and key in rows[0]), None)


def parent_note(s: SweepSummary) -> str:
    """The parent run's description: where the sweep's summary runs and its best fits are in MLflow's UI."""
    metric = headline_metric(s.rows)
    lines = [
        f"{s.n_fits} fits; {len(s.summary_runs)} table rows, each a summary run (mean, std and 95% interval "
        f"over clips per metric) in experiment '{summary_experiment(s.experiment)}':"
    ]
    lines += [f"- [summary runs]({s.summary_ui_url(f'{metric}/mean' if metric else None)})"]
    lines += [f"- [the rows side by side]({s.compare_ui_url()})"]
    if metric:
        lines += [f"- [the best fits by {metric}]({s.fits_ui_url(metric)})"]
    return "\n".join(lines)


def _same(logged: dict[str, float], metrics: dict[str, float]) -> bool:
    return logged.keys() >= metrics.keys() and all(
        math.isclose(logged[k], v, rel_tol=1e-12, abs_tol=0.0) or (math.isnan(v) and math.isnan(logged[k]))
        for k, v in metrics.items()
    )


def print_summary_runs(name: str, s: SweepSummary) -> None:
    """Where the summary runs and the best fits are in MLflow's UI."""
    metric = headline_metric(s.rows)
    print(
        f"[{name}] {len(s.summary_runs)} summary run{'' if len(s.summary_runs) == 1 else 's'} (mean and 95% "
        f"interval over clips per table row) in MLflow "
        f"experiment '{summary_experiment(s.experiment)}': {s.summary_ui_url(f'{metric}/mean' if metric else None)}",
        flush=True,
    )
    print(f"[{name}] the rows side by side: {s.compare_ui_url()}", flush=True)
    if metric:
        print(f"[{name}] the best fits by {metric}: {s.fits_ui_url(metric)}", flush=True)
