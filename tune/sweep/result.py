"""What a sweep returns (SweepSummary: counts, rows, timings, where its runs are) and the links into MLflow's UI it
gives (the fits' and the summary runs' pages, sorted by a metric)."""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from typing import Any

from fewsound.tracking import ui_url

STAT_SUFFIXES = ("mean", "std", "ci95_low", "ci95_high", "n")  # a summary run's statistics per metric


def runs_page_url(experiment_url: str, search_filter: str = "", order_by: str | None = None) -> str:
    """An experiment's runs page in MLflow's UI (`experiment_url`: fewsound.tracking.ui_url) with its search box
    set to `search_filter` and its rows sorted by metric `order_by`, best first (in fewsound.tables.COLUMNS'
    direction). The UI keeps its search in these URL parameters on the runs page itself (the experiment's page
    redirects there and drops them)."""
    from fewsound.tables import COLUMNS

    page, _, query = experiment_url.partition("?")
    params = dict(urllib.parse.parse_qsl(query))
    if search_filter:
        params["searchFilter"] = search_filter
    if order_by:
        base = order_by.rsplit("/", 1)[0] if order_by.rsplit("/", 1)[-1] in STAT_SUFFIXES else order_by
        lower = any(key == base and better == "lower" for _, key, better in COLUMNS)
        params.update(orderByKey=f"metrics.`{order_by}`", orderByAsc="true" if lower else "false")
    page = page if page.endswith("/runs") else f"{page}/runs"
    return f"{page}?{urllib.parse.urlencode(params, quote_via=urllib.parse.quote)}"


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
    # trial), device / cuda_visible_devices (where its fits ran, as the trial saw it), gpu_share (the memory share
    # its process is capped at: 1.0 where nothing is capped), pack and trial (indices). A trial runs one or more
    # packs in turn.
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
