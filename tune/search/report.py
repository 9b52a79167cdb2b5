"""What a search's parent run gets when it ends: the comparison with its start points, every trial as CSV, what
mattered (Optuna's hyper-parameter importances as JSON and Markdown, parallel-coordinates, slice and importance
plots), quality against parameters for every trial, and the listening page of the start points and the best
trials.

    finish_parent(parent, study, summary, ctx, max_params, listen_clips)

Importances come from two of Optuna's evaluators that need no extra package beyond what the project installs:
PED-ANOVA (Optuna's default; it also weighs parameters only some trials have, e.g. one family's knobs in a
search over several) and fANOVA (scikit-learn's random forest; parameters every completed trial has). Both are
computed over the trials that ran every step (a trial ASHA stopped has a value at fewer steps).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from fewsound.tracking import MlflowRun
from tune.search.results import PAPER, SearchContext, SearchSummary, start_label, trial_row
from tune.search.study import START_KEY, fitted_trials
from tune.spine import BEST_RUN_TAG, BEST_TRIAL_TAG

LISTEN_BEST = 3  # best trials shown on the listening page beside the start points
EVALUATORS = {
    "ped_anova": lambda: optuna.importance.PedAnovaImportanceEvaluator(),
    "fanova": lambda: optuna.importance.FanovaImportanceEvaluator(seed=0),
}


def importances(study: optuna.Study) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """(evaluator -> {parameter: share of the importance}, evaluator -> why it gave nothing)."""
    out, why = {}, {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for name, make in EVALUATORS.items():
        if len(complete) < 3:
            why[name] = f"{len(complete)} trials ran every step (needs 3 or more)"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-feature warnings
                got = optuna.importance.get_param_importances(study, evaluator=make())
            out[name] = {k: float(v) for k, v in got.items()}
        except Exception as e:  # e.g. too few trials for the evaluator's quantiles, or one value everywhere
            why[name] = f"{type(e).__name__}: {e}"
    return out, why


def importances_markdown(imp: dict[str, dict[str, float]], why: dict[str, str], n_complete: int) -> str:
    lines = [f"### Hyper-parameter importances ({n_complete} trials that ran every step)", ""]
    params = list(dict.fromkeys(p for d in imp.values() for p in d))
    if params:
        names = list(imp)
        lines += ["| parameter | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for p in params:
            cells = [f"{imp[n][p]:.3f}" if p in imp[n] else "-" for n in names]  # "-": not assessed
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    for name, reason in why.items():
        lines.append(f"\n{name}: none ({reason})")
    return "\n".join(lines)


def _plots(study: optuna.Study, imp: dict[str, dict[str, float]], out: Path) -> list[Path]:
    """Optuna's matplotlib plots (parallel coordinates and slices of the most important parameters, the
    importances); a plot Optuna cannot draw for this study is left out."""
    import matplotlib

    matplotlib.use("Agg")  # the driver may have no display
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    top = list(next(iter(imp.values()), {}))[:6] or None
    made = []
    plots = {
        "parallel_coordinates.png": lambda: ovm.plot_parallel_coordinate(study, params=top),
        "slice.png": lambda: ovm.plot_slice(study, params=top),
        "importances.png": lambda: ovm.plot_param_importances(study),
    }
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
        except Exception as e:
            print(f"[search_inr] no {name}: {type(e).__name__}: {e}", flush=True)
            continue
        ax = axes.flat[0] if hasattr(axes, "flat") else axes
        fig = ax.figure
        fig.set_size_inches(max(8.0, fig.get_size_inches()[0]), 5.0)
        fig.savefig(out / name, dpi=90, bbox_inches="tight")
        plt.close(fig)
        made.append(out / name)
    return made


def quality_vs_params(rows: list[dict[str, Any]], ctx: SearchContext, max_params: int | None, path: Path) -> Path:
    """Every fitted trial: the objective against its parameter count (per family; hollow: stopped early by ASHA,
    at fewer steps), the start points named, the budget as a line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    colors = dict(zip(ctx.families, [f"C{i}" for i in range(10)]))
    for family in ctx.families:
        for outcome, face in (("finished", None), ("stopped_early", "none")):
            pts = [
                (r["num_params"], r["objective"])
                for r in rows
                if r["family"] == family and r["outcome"] == outcome and r["objective"] is not None
            ]
            if pts:
                xs, ys = zip(*pts)
                label = family if outcome == "finished" else f"{family}, stopped early"
                ax.scatter(
                    xs, ys, s=28, c=colors[family] if face is None else "none", edgecolors=colors[family], label=label
                )
    for r in rows:
        if r[START_KEY] and r["outcome"] == "finished":
            ax.scatter(
                [r["num_params"]],
                [r["objective"]],
                marker="*",
                s=180,
                c=colors[r["family"]],
                edgecolors="black",
                zorder=3,
            )
            ax.annotate(
                start_label(r[START_KEY], ctx.families),
                (r["num_params"], r["objective"]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=8,
            )
    if max_params:
        ax.axvline(max_params, color="gray", linestyle="--", label=f"budget {max_params:,}")
    ax.set_xlabel("# parameters")
    ax.set_ylabel(f"objective ({ctx.objective}, mean over {len(ctx.clips)} clips)")
    ax.set_title(f"search {ctx.name}: every trial ({len(rows)}; stars: start points)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)
    return path


def listen_rows(summary: SearchSummary, rows: list[dict[str, Any]], ctx: SearchContext) -> list[dict[str, Any]]:
    """The listening page's rows: per clip, each start point and the LISTEN_BEST best trials that ran every
    step, with each clip's own metrics; the audio is in the trial's run under audio/<clip>."""
    finished = [r for r in rows if r["outcome"] == "finished"]
    ranked = sorted(finished, key=lambda r: r["objective"], reverse=summary.mode == "max")
    best = [r for r in ranked if not r[START_KEY]][:LISTEN_BEST]
    shown = [(start_label(r[START_KEY], ctx.families), r) for r in summary.starts]
    shown += [
        (f"{'best' if i == 0 else f'#{i + 1}'} (trial {r['number']}, {r['family']})", r) for i, r in enumerate(best)
    ]
    out = []
    for label, r in shown:
        for clip in ctx.clips:
            out.append(
                {
                    "key": f"{r['number']}-{clip}",
                    "label": label,
                    "family": r["family"],
                    "clip_id": clip,
                    "length": ctx.length,
                    "kind": ctx.kind,
                    "run_id": r["mlflow_run_id"],
                    "audio": f"audio/{clip}",
                    "model/params": r["num_params"],
                    **r["per_clip"].get(clip, {}),
                }
            )
    return out


def finish_parent(
    parent: MlflowRun,
    study: optuna.Study,
    s: SearchSummary,
    ctx: SearchContext,
    max_params: int | None,
    listen_clips: int | None = None,
) -> None:
    """Log the search's outcome on its parent run and end it (FINISHED when some trial ran every step)."""
    from tune.report import log_listen_page

    rows = [trial_row(t) for t in fitted_trials(study)]
    paper = next((r for r in s.starts if r[START_KEY].startswith(PAPER)), None)
    parent.log_metrics(
        {
            "search/trials": s.trials,
            "search/finished": s.finished,
            "search/stopped_early": s.stopped_early,
            "search/failed": s.failed,
            "search/rejected_over_budget": s.rejected,
            "search/seconds": s.seconds,
            "search/best_objective": s.best["objective"] if s.best else None,
            "search/paper_objective": paper["objective"] if paper else None,
            "search/paper_stays_best": float(s.paper_stays_best),
        }
    )
    if s.best:
        parent.set_tags({BEST_RUN_TAG: s.best["mlflow_run_id"], BEST_TRIAL_TAG: s.best["number"]})
    imp, why = importances(study)
    s.importances = imp
    s.artifacts = _log_search_files(parent, study, s, ctx, max_params, rows, imp, why)
    page = listen_rows(s, rows, ctx)
    order = list(dict.fromkeys(r["label"] for r in page))
    log_listen_page(
        parent.uri,
        parent.run_id,
        page,
        {
            "title": f"search {ctx.name}: start points and best trials",
            "row_header": "configuration",
            "label_order": order,
        },
        listen_clips,
    )
    if page and (listen_clips is None or listen_clips > 0):
        s.artifacts.append("report/listen.html")
    parent.end("FINISHED" if s.best else "FAILED")


def _log_search_files(
    parent: MlflowRun,
    study: optuna.Study,
    s: SearchSummary,
    ctx: SearchContext,
    max_params: int | None,
    rows: list[dict[str, Any]],
    imp: dict[str, dict[str, float]],
    why: dict[str, str],
) -> list[str]:
    """search/ on the parent run: the comparison, every trial and rejected suggestion as CSV, the best
    configuration, the importances and the plots. Returns the artifact paths."""
    from fewsound.tables import rows_to_csv

    rejected = [
        dict(json.loads(t.user_attrs.get("point", "{}")), num_params=t.user_attrs.get("num_params"))
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get("outcome") == "rejected"
    ]
    table = [
        {k: v for k, v in r.items() if k not in ("params", "per_clip")}
        | {f"param.{k}": v for k, v in r["params"].items()}
        for r in rows
    ]
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        files = {
            "comparison.md": s.comparison_markdown,
            "trials.csv": rows_to_csv(table) if table else "",
            "rejected_over_budget.csv": rows_to_csv(rejected) if rejected else "",
            "best_config.json": json.dumps(
                {
                    "family": s.best["family"] if s.best else None,
                    "params": s.best["params"] if s.best else None,
                    "objective": s.best["objective"] if s.best else None,
                    "start_point": s.best[START_KEY] if s.best else None,
                },
                indent=2,
            ),
            "importances.json": json.dumps({"importances": imp, "not_computed": why}, indent=2),
            "importances.md": importances_markdown(imp, why, n_complete),
        }
        for name, text in files.items():
            if text:  # e.g. no suggestion was over the budget
                (out / name).write_text(text)
        (out / "plots").mkdir()
        if rows:
            quality_vs_params(rows, ctx, max_params, out / "plots" / "quality_vs_params.png")
        if n_complete >= 2:
            _plots(study, imp, out / "plots")
        parent.log_artifact(out, "search")
        return sorted(f"search/{p.relative_to(out)}" for p in out.rglob("*") if p.is_file())
