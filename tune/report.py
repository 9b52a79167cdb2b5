"""Reports regenerated from MLflow: a sweep's finished child runs -> the paper's tables and figures.

    parent, rows = collect(uri, parent_run_id)
    paths, markdown = write_report(uri, parent, rows, out_dir)

Rows are the same flat dicts the sweep driver builds (label, length, kind, clip_id, metrics), so a report made
later from MLflow alone equals the tables the sweep logged when it finished.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fewsound.errors import ConfigError
from fewsound.tracking import PARENT_TAG

PAPER_TABLE = {"speech": 1, "music": 18, "environment": 19}
PAPER_LABELS = ["NERF", "SIREN", "FINER", "WIRE", "RFF", "KAN"]


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def latest_parent(uri: str, experiment: str) -> str:
    """The run id of the experiment's most recently started sweep (parent run)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError("--experiment", f"no MLflow experiment {experiment!r} at {uri}")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`fewsound.role` = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise ConfigError("--experiment", f"experiment {experiment!r} has no sweep (parent run)")
    return runs[0].info.run_id


def collect(uri: str, parent_run_id: str) -> tuple[Any, list[dict[str, Any]]]:
    """(the parent run, one row per FINISHED child fit). Fits a resumed sweep took over from another sweep of the
    experiment are found through the parent's tables/results.csv."""
    import csv
    import io

    client = _client(uri)
    try:
        parent = client.get_run(parent_run_id)
    except Exception as e:  # mlflow raises its own RestException for an unknown id
        raise ConfigError("--run-id", f"no MLflow run {parent_run_id!r} at {uri} ({type(e).__name__})") from None
    runs, token = [], None
    while True:
        page = client.search_runs(
            [parent.info.experiment_id],
            max_results=5000,
            page_token=token,
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'",
        )
        runs += page
        token = page.token
        if not token:
            break
    have = {r.info.run_id for r in runs}
    with tempfile.TemporaryDirectory() as d:
        try:
            path = client.download_artifacts(parent_run_id, "tables/results.csv", d)
            listed = [row.get("run_id") for row in csv.DictReader(io.StringIO(Path(path).read_text()))]
        except Exception:  # no results table (a search, or a sweep that finished nothing)
            listed = []
    runs += [client.get_run(rid) for rid in dict.fromkeys(listed) if rid and rid not in have]
    return parent, [_row(r) for r in runs]


def _row(run: Any) -> dict[str, Any]:
    p, t = run.data.params, run.data.tags
    row = {
        "key": t.get("fewsound.fit_key", run.info.run_id),
        "label": t.get("fewsound.label") or p.get("label") or run.info.run_name,
        "family": p.get("family"),
        "clip_id": p.get("clip_id", p.get("clips")),
        "length": int(p.get("clip.length", 0)),
        "kind": p.get("clip.kind"),
        "run_id": run.info.run_id,
    }
    row.update(run.data.metrics)
    return row


def write_report(
    uri: str, parent: Any, rows: list[dict[str, Any]], out: Path, *, clip: str | None = None, max_spectrograms: int = 8
) -> tuple[list[Path], str]:
    """Tables (and, for an ablation, per-knob tables and the quality-vs-params plot) and the spectrogram
    comparison into `out`. Returns (paths, the tables as Markdown)."""
    from fewsound import tables
    from fewsound.ablation import KNOBS, configs, write_ablation_report

    if not rows:
        raise ConfigError(parent.info.run_id, "the sweep has no finished fits to report")
    out = Path(out)
    job = parent.data.tags.get("fewsound.job", "")
    kinds = {r["kind"] for r in rows}
    paper = PAPER_TABLE.get(kinds.pop()) if len(kinds) == 1 and job == "fit_inrs" else None
    spec = {
        "title": f"{job or 'sweep'}: reconstruction metrics (regenerated from MLflow)",
        "row_header": "INR" if job == "fit_inrs" else "configuration",
        "paper_table": paper,
        # the paper's order: Table 1's families, or the ablation's knobs and values (the base first)
        "label_order": list(configs(list(KNOBS.values()), 1)) if job == "kan_ablation" else PAPER_LABELS,
    }
    paths = tables.write_results(out, rows, **spec)
    markdown = (out / "table.md").read_text()
    label_order = [r.label for g in tables.build_table(rows, **spec).groups for r in g.rows]
    if job == "kan_ablation":
        more, markdown = write_ablation_report(out / "ablation", rows)
        paths += more
    png = spectrogram_comparison(
        uri, rows, out / "spectrograms.png", clip, list(dict.fromkeys(label_order)), max_spectrograms
    )
    if png:
        paths.append(png)
    return paths, markdown


def spectrogram_comparison(
    uri: str, rows: list[dict[str, Any]], path: Path, clip: str | None, label_order: list[str], max_rows: int
) -> Path | None:
    """Ground truth and each label's reconstruction of one clip, from the runs' audio artifacts (None when the
    runs have no audio, e.g. a search)."""
    from fewsound.data.audio import read_audio
    from fewsound.report import save_figure, spectrogram_comparison_figure

    shortest = min(r["length"] for r in rows)
    at = [r for r in rows if r["length"] == shortest]
    if clip is None:
        counts: dict[str, int] = {}
        for r in at:
            counts[r["clip_id"]] = counts.get(r["clip_id"], 0) + 1
        clip = max(counts, key=lambda c: counts[c])  # the clip with the most rows (first on ties)
    chosen = {r["label"]: r for r in at if r["clip_id"] == clip}
    if not chosen:
        raise ConfigError("--clip", f"no finished fit of clip {clip!r} in this sweep")
    labels = [lab for lab in label_order if lab in chosen][:max_rows]
    client = _client(uri)
    preds, ref, sr = {}, None, 22_050
    with tempfile.TemporaryDirectory() as d:
        for i, lab in enumerate(labels):
            run_id = chosen[lab]["run_id"]
            try:
                pred, sr = read_audio(client.download_artifacts(run_id, "audio/pred.wav", f"{d}/{i}"))
                if ref is None:
                    ref, sr = read_audio(client.download_artifacts(run_id, "audio/gt.wav", f"{d}/{i}"))
            except Exception:  # this run logged no audio
                continue
            preds[lab] = pred
    if ref is None:
        return None
    fig = spectrogram_comparison_figure(ref, preds, sr, title=f"{clip} ({shortest / sr:.1f} s)")
    return save_figure(fig, path)
