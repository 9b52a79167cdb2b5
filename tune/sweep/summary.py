"""What a sweep reports at the end: one row per finished fit, a line per failed fit, a FAILED run for each fit whose
trial crashed beyond its retries, the parent run's tables, quality plot and listening page, and one summary run
per row of its table (tune.sweep.summary_runs).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from fewsound.plan import FitTask
from fewsound.tracking import MlflowRun, ui_url
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
from tune.sweep.summary_runs import log_summary_runs, parent_note, runs_page_url


@dataclasses.dataclass
class SweepSummary:
    sweep: str
    experiment: str
    parent_run_id: str
    tracking_uri: str
    n_fits: int
    skipped: int
    done: int
    failed: int
    seconds: float
    resources: dict[str, float]
    rows: list[dict[str, Any]]  # one per finished fit: key, label, family, clip_id, length, kind, metrics...
    table_markdown: str = ""  # the paper-style table regenerated from `rows`
    # One dict per pack that reported: what run_pack returned (fits_done, fit_seconds, eval_seconds, log_seconds,
    # start, end, pid, torch_threads), assigned_CPU / assigned_GPU (the resources the scheduler granted its
    # trial), pack and trial (indices). A trial runs one or more packs in turn.
    packs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    n_trials: int = 0  # Tune trials run
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per driver phase
    replayed: int = 0  # of `skipped`: fits logged at the start from records (computed before, not refitted)
    records: str = ""  # where the sweep's fit records are (fewsound.records)

    experiment_id: str | None = None
    summary_runs: dict[str, str] = dataclasses.field(default_factory=dict)  # table row -> its summary run's id
    summary_experiment_id: str | None = None  # the experiment of the summary runs (summary_experiment)

    @property
    def ui_url(self) -> str:
        """The sweep's experiment in MLflow's UI, opened on its runs."""
        return ui_url(self.tracking_uri, self.experiment_id)

    def summary_ui_url(self, order_by: str | None = None) -> str:
        """The summary experiment's runs page in MLflow's UI (one run per table row), sorted by metric `order_by`
        (best first, in fewsound.tables.COLUMNS' direction) where given."""
        return runs_page_url(ui_url(self.tracking_uri, self.summary_experiment_id), "", order_by)

    def compare_ui_url(self) -> str:
        """MLflow UI's comparison of the summary runs: every row's mean, std and interval per metric side by side."""
        runs, exps = json.dumps(list(self.summary_runs.values())), json.dumps([self.summary_experiment_id])
        page = ui_url(self.tracking_uri).partition("#")[0]
        return f"{page}#/compare-runs?runs={urllib.parse.quote(runs)}&experiments={urllib.parse.quote(exps)}"

    def fits_ui_url(self, order_by: str | None = None) -> str:
        """The fits' experiment's runs page sorted by metric `order_by`, best first: the best fits."""
        return runs_page_url(self.ui_url, "", order_by)


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
