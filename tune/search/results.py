"""What a search is and what it found: its context (what every trial fits), the summary of its study, and
the comparison table of the best trial with the start points."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from fewsound.errors import ConfigError
from fewsound.search_space import (
    FINAL_METRICS,
    KNOBS,
)
from fewsound.tracking import MlflowRun, ui_url
from tune.search.study import (
    START_KEY,
    fitted_trials,
)

PAPER = "paper"  # the name of a family's paper configuration among the start points ("paper" or "paper kan")


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """What a search fits and how it scores (the job's options): every trial fits one configuration of `families`
    on `clips` of `corpus` (`length` samples of `kind`) for `steps`, scored on `objective` after each of `chunks`."""

    families: tuple[str, ...]
    corpus: str
    clips: tuple[str, ...]
    kind: str
    length: int
    steps: int
    chunks: int
    objective: str
    weights: dict[str, float]
    seed: int
    experiment: str
    final_metrics: tuple[str, ...] = FINAL_METRICS
    sample_rate: int = 22_050  # of the corpus's clips (the paper's protocol)
    log_audio: bool = True  # each clip's gt/pred audio and spectrogram on trials that ran every step

    @classmethod
    def of(cls, spec: SearchSpec | dict[str, Any]) -> SearchSpec:
        """A spec from itself or from its fields by keyword (a ConfigError names an unknown or missing field)."""
        if isinstance(spec, SearchSpec):
            return spec
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - names)
        if unknown:
            raise ConfigError("run_search", f"unknown search field(s): {', '.join(unknown)}")
        try:
            return cls(**spec)
        except TypeError as e:
            raise ConfigError("run_search", str(e)) from None


@dataclasses.dataclass(frozen=True)
class SearchContext(SearchSpec):
    """A search's spec and the parent run its trials log under: what every trial is handed."""

    parent_run_id: str = ""
    tracking_uri: str = ""

    @classmethod
    def under(cls, spec: SearchSpec, parent_run_id: str, tracking_uri: str) -> SearchContext:
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(SearchSpec)}
        return cls(**fields, parent_run_id=parent_run_id, tracking_uri=tracking_uri)

    @property
    def chunk_steps(self) -> int:
        return max(1, self.steps // self.chunks)

    @property
    def name(self) -> str:
        return "+".join(self.families) if len(self.families) < len(KNOBS) else "any"


def start_label(name: str, families: tuple[str, ...] | list[str]) -> str:
    """How a start point is shown: "paper config" (one family) / "paper kan"; a user's point as named."""
    if name.startswith(PAPER):
        return "paper config" if len(families) == 1 else name
    return name


@dataclasses.dataclass
class SearchSummary:
    experiment: str
    parent_run_id: str
    tracking_uri: str
    mode: str
    trials: int  # fitted trials of the study (this run and the runs it resumed)
    finished: int  # ran every step
    stopped_early: int  # stopped by ASHA
    failed: int
    rejected: int  # suggestions over the parameter budget (never fitted)
    resumed: int  # trials that had ended before this run
    best: dict[str, Any] | None  # the best trial that ran every step (start points included)
    starts: list[dict[str, Any]]  # the start points that ran every step (the paper's configuration first)
    comparison_markdown: str
    seconds: float
    artifacts: list[str] = dataclasses.field(default_factory=list)  # what the parent run got
    importances: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # evaluator -> param -> share
    heldout: Any = None  # tune.search.heldout.HeldOutResult when the search was validated on held-out clips

    experiment_id: str | None = None

    @property
    def ui_url(self) -> str:
        """The search's experiment in MLflow's UI, opened on its runs."""
        return ui_url(self.tracking_uri, self.experiment_id)

    @property
    def paper_stays_best(self) -> bool:
        return bool(self.best and str(self.best.get(START_KEY) or "").startswith(PAPER))


def trial_row(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """One fitted trial of the study: its point, outcome, objective, metrics, parameter count and run."""
    point = json.loads(t.user_attrs.get("point", "{}"))
    return {
        "number": t.number,
        "params": point,
        "family": point.get("family"),
        START_KEY: t.user_attrs.get(START_KEY),
        "outcome": t.user_attrs.get("outcome"),
        "objective": t.value if t.state == TrialState.COMPLETE else _last_value(t),
        "num_params": t.user_attrs.get("num_params"),
        "steps": t.user_attrs.get("steps"),
        "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
        "per_clip": json.loads(t.user_attrs.get("per_clip") or "{}"),
        **t.user_attrs.get("metrics", {}),
    }


def _last_value(t: optuna.trial.FrozenTrial) -> float | None:
    return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None


def summarize_study(
    study: optuna.Study, parent: MlflowRun, ctx: SearchContext, mode: str, resumed: int, t0: float
) -> SearchSummary:
    """The search's outcome from the whole study (every run of it): the best trial that ran every step, start
    points included, and the start points themselves."""
    rows = [trial_row(t) for t in fitted_trials(study)]
    finished = [r for r in rows if r["outcome"] == "finished"]
    best = (max if mode == "max" else min)(finished, key=lambda r: r["objective"]) if finished else None
    starts = sorted(
        (r for r in finished if r[START_KEY]), key=lambda r: (not r[START_KEY].startswith(PAPER), r["number"])
    )
    rejected = sum(t.user_attrs.get("outcome") == "rejected" for t in study.get_trials(deepcopy=False))
    s = SearchSummary(
        ctx.experiment,
        parent.run_id,
        parent.uri,
        mode,
        len(rows),
        len(finished),
        sum(r["outcome"] == "stopped_early" for r in rows),
        sum(r["outcome"] == "failed" for r in rows),
        rejected,
        resumed,
        best,
        starts,
        "",
        time.perf_counter() - t0,
    )
    s.comparison_markdown = comparison_markdown(s, ctx)
    return s


FIELDS = [
    ("objective", "objective"),
    ("# params", "num_params"),
    ("PSNR", "eval/psnr"),
    ("LSD", "eval/lsd"),
    ("SI-SNR", "eval/si_snr"),
    ("PESQ", "eval/pesq"),
    ("STOI", "eval/stoi"),
    ("MSE", "eval/mse"),
]


def comparison_markdown(s: SearchSummary, ctx: SearchContext) -> str:
    """The best trial vs the start points (same clips and steps) as a Markdown table, and whether the paper's
    configuration stayed best."""

    def fmt(v):
        if v is None:
            return "-"
        return f"{int(v):,}" if float(v).is_integer() and abs(v) >= 100 else f"{v:.4g}"

    rows = [(start_label(r[START_KEY], ctx.families), r) for r in s.starts]
    if s.best and not s.best[START_KEY]:
        rows.append(("best trial", s.best))
    out = [
        f"### {ctx.name}: best of {s.trials} trials vs the start points (objective {ctx.objective}, {s.mode})",
        "",
        "| | family | " + " | ".join(c for c, _ in FIELDS) + " |",
        "|---|---|" + "---|" * len(FIELDS),
    ]
    for name, r in rows:
        out.append(f"| {name} | {r['family']} | " + " | ".join(fmt(r.get(k)) for _, k in FIELDS) + " |")
    out.append("")
    if s.best and s.best[START_KEY]:
        who = start_label(s.best[START_KEY], ctx.families)
        out.append(f"**the start point {who!r} stays best**: no trial of the search beat it")
    elif s.best:
        out.append(f"best trial: #{s.best['number']} ({s.best['family']}, {s.best['num_params']:,} parameters)")
    if s.best:
        out.append("best configuration: " + json.dumps(s.best["params"], sort_keys=True))
    out.append(
        f"{s.finished} trials ran every step, {s.stopped_early} stopped early by ASHA, {s.failed} failed, "
        f"{s.rejected} suggestions over the parameter budget never fitted"
        + (f"; {s.resumed} trials came from an earlier run of this search" if s.resumed else "")
    )
    return "\n".join(out)
