"""What a sweep reports at the end: one row per finished fit, a line per failed fit, a FAILED run for each fit whose
trial crashed beyond its retries, the parent run's tables, quality plot and listening page, and one summary run
per row of its table (tune.sweep.summary_runs).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from fewsound.plan import FitTask
from fewsound.tracking import MlflowRun
from tune.spine import (
    FAMILY_TAG,
    FIT_KEY_TAG,
    LABEL_TAG,
    NOTE_TAG,
    PACK_TAG,
    REASON_TAG,
    SWEEP_TAG,
    search_runs,
    tag_filter,
)
from tune.sweep.context import TrialContext, pack_id
from tune.sweep.result import SweepSummary
from tune.sweep.summary_runs import log_summary_runs, parent_note


def finished_runs(client: Any, exp_id: str) -> dict[str, Any]:
    """key -> its FINISHED child run, over the whole experiment (any sweep that finished a fit counts)."""
    runs = search_runs(client, exp_id, "attributes.status = 'FINISHED'")
    return {r.data.tags[FIT_KEY_TAG]: r for r in runs if FIT_KEY_TAG in r.data.tags}


def print_failures(name: str, client: Any, exp_id: str, sid: str, keys: set[str]) -> None:
    """One line per fit of this run that FAILED, with the reason on its child run (no tracebacks)."""
    failed = search_runs(client, exp_id, f"attributes.status = 'FAILED' and {tag_filter(SWEEP_TAG, sid)}")
    seen = set()
    for r in failed:
        key = r.data.tags.get(FIT_KEY_TAG)
        if key in keys and key not in seen:
            seen.add(key)
            reason = " ".join(r.data.tags.get(REASON_TAG, "no reason recorded").split())
            print(f"[{name}] FAILED {key}: {reason[:300]}", flush=True)


def record_crashed_trials(grid: Any, packs: list[list[FitTask]], ctx: TrialContext, client: Any, exp_id: str) -> None:
    """A trial that crashed beyond its retries leaves fits without a run: record each as FAILED with the reason."""
    crashed = [r for r in grid if r.error is not None]
    if not crashed:
        return
    finished = finished_runs(client, exp_id)
    for result in crashed:
        lines = str(result.error).strip().splitlines() or [""]
        reason = f"trial crashed: {type(result.error).__name__}: {lines[-1][:300]}"
        for idx in (int(p["index"]) for p in result.config["trial"]["packs"]):
            _record_failed_pack(packs[idx], reason, ctx, finished)


def _record_failed_pack(tasks: list[FitTask], reason: str, ctx: TrialContext, finished: dict[str, Any]) -> None:
    pid = pack_id(tasks)
    for t in tasks:
        if t.key in finished:
            continue
        run = MlflowRun(
            ctx.experiment,
            uri=ctx.tracking_uri,
            run_name=t.key,
            parent_run_id=ctx.parent_run_id,
            tags={
                FIT_KEY_TAG: t.key,
                SWEEP_TAG: ctx.sweep,
                REASON_TAG: reason,
                PACK_TAG: pid,
                FAMILY_TAG: t.family,
                LABEL_TAG: t.label,
            },
        )
        run.log_params(t.params())
        run.end("FAILED")


def row(t: FitTask, run: Any) -> dict[str, Any]:
    row = {
        "key": t.key,
        "label": t.label or t.family,
        "family": t.family,
        "clip_id": t.clip_id,
        "length": t.length,
        "kind": t.kind,
        "run_id": run.info.run_id,
    }
    row.update(run.data.metrics)
    return row


def finish_parent(parent: MlflowRun, s: SweepSummary, table: dict[str, Any], listen_clips: int | None = None) -> None:
    from fewsound import tables
    from tune.report import log_listen_page

    parent.log_metrics(
        {"sweep/fits": s.n_fits, "sweep/done": s.done + s.skipped, "sweep/failed": s.failed, "sweep/seconds": s.seconds}
    )
    with tempfile.TemporaryDirectory() as d:
        if s.rows:
            tables.write_results(Path(d), s.rows, **table)
            parent.log_artifact(d, "tables")  # results.csv, table.md, table.tex, table.csv
            s.table_markdown = (Path(d) / "table.md").read_text()
            built = tables.build_table(s.rows, **{"title": "Reconstruction metrics", **table})
            parent.log_artifact(_quality_plot(built, Path(d) / "plots"), "plots")
            s.summary_experiment_id, s.summary_runs = log_summary_runs(parent, s, built)
            parent.set_tags({NOTE_TAG: parent_note(s)})
    log_listen_page(parent.uri, parent.run_id, s.rows, table, listen_clips)  # report/listen.html
    parent.end("FINISHED" if s.failed == 0 else "FAILED")


def _quality_plot(table: Any, out: Path) -> Path:
    """plots/quality_vs_params.png of the parent run: each row of the table (mean over clips) at its parameter
    count, a series per clip length: which INR buys the most quality per parameter."""
    from fewsound import tables
    from fewsound.report import quality_vs_params_figure, save_figure

    points = tables.quality_points(table)
    title = f"{table.title}: quality vs parameter count"
    return save_figure(quality_vs_params_figure(points, title=title), out / "quality_vs_params.png")


def summarize(
    s: Any, plan: Any, packs: list[dict[str, Any]], n_trials: int, timings: dict[str, float], t0: float
) -> SweepSummary:
    """The SweepSummary of an opened sweep `s` (tune.sweep.driver) after its trials: one row per finished fit."""
    # nothing ran (every fit was finished): the runs found at the start are the sweep's runs, not searched again
    finished = s.finished if n_trials == 0 else finished_runs(s.parent.client, s.parent.experiment_id)
    rows = [row(t, finished[t.key]) for t in s.tasks if t.key in finished]
    skipped = len(s.tasks) - len(s.todo)
    summary = SweepSummary(
        s.sid,
        s.experiment,
        s.parent.run_id,
        s.uri,
        len(s.tasks),
        skipped,
        len(rows) - skipped,
        len(s.tasks) - len(rows),
        time.perf_counter() - t0,
        plan.resources,
        rows,
        packs=packs,
        n_trials=n_trials,
        timings=timings,
        experiment_id=s.parent.experiment_id,
    )
    summary.replayed, summary.records = s.replayed, s.watch.where
    return summary
