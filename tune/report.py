"""Reports regenerated from MLflow: a sweep's finished child runs -> the paper's tables and figures.

    parent, rows = collect(uri, parent_run_id)
    paths, markdown = write_report(uri, parent, rows, out_dir)

Rows are the same flat dicts the sweep driver builds (label, length, kind, clip_id, metrics), so a report made
later from MLflow alone equals the tables the sweep logged when it finished.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from fewsound.errors import ConfigError
from fewsound.tracking import PARENT_TAG
from tune.spine import COMMAND_TAG, FIT_KEY_TAG, JOB_TAG, LABEL_TAG, N_FITS_TAG, ROLE_TAG, SWEEP_TAG

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
        filter_string=f"tags.`{ROLE_TAG}` = 'parent'",
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
        "key": t.get(FIT_KEY_TAG, run.info.run_id),
        "label": t.get(LABEL_TAG) or p.get("label") or run.info.run_name,
        "family": p.get("family"),
        "clip_id": p.get("clip_id", p.get("clips")),
        "length": int(p.get("clip.length", 0)),
        "kind": p.get("clip.kind"),
        "run_id": run.info.run_id,
    }
    row.update(run.data.metrics)
    return row


def _table_spec(job: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """build_table keyword arguments for a sweep of job `job`: its paper table, row header and the paper's order."""
    from fewsound.ablation import KNOBS, configs

    kinds = {r["kind"] for r in rows}
    paper = PAPER_TABLE.get(kinds.pop()) if len(kinds) == 1 and job == "fit_inrs" else None
    return {
        "title": f"{job or 'sweep'}: reconstruction metrics (regenerated from MLflow)",
        "row_header": "INR" if job == "fit_inrs" else "configuration",
        "paper_table": paper,
        # the paper's order: Table 1's families, or the ablation's knobs and values (the base first)
        "label_order": list(configs(list(KNOBS.values()), 1)) if job == "kan_ablation" else PAPER_LABELS,
    }


def write_report(
    uri: str,
    parent: Any,
    rows: list[dict[str, Any]],
    out: Path,
    *,
    clip: str | None = None,
    max_spectrograms: int = 8,
    listen_clips: int | None = None,
) -> tuple[list[Path], str]:
    """Tables (and, for an ablation, per-knob tables and the quality-vs-params plot), the spectrogram
    comparison and the listening page (also logged on the parent run as report/listen.html; `listen_clips` clips,
    None: fewsound.listen.default_clips, 0: none) into `out`. Returns (paths, the tables as Markdown)."""
    from fewsound import tables
    from fewsound.ablation import write_ablation_report

    if not rows:
        raise ConfigError(parent.info.run_id, "the sweep has no finished fits to report")
    out = Path(out)
    job = parent.data.tags.get(JOB_TAG, "")
    spec = _table_spec(job, rows)
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
    # a search's trials fit several clips each: it logs its own page (tune.search.report), which a page made from
    # one row per run here would replace with one that has no audio
    if job != "search_inr" and (listen_clips is None or listen_clips > 0):
        paths.append(write_listen_page(uri, parent.info.run_id, rows, out / "listen.html", spec, listen_clips))
    return paths, markdown


def spectrogram_comparison(
    uri: str, rows: list[dict[str, Any]], path: Path, clip: str | None, label_order: list[str], max_rows: int
) -> Path | None:
    """Ground truth and each label's reconstruction of one clip, from the runs' audio artifacts (None when the
    runs have no audio, e.g. a search)."""
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
            got = fit_audio(client, run_id, "pred", Path(d) / str(i))
            if got is None:  # this run logged no audio
                continue
            preds[lab], sr = got
            if ref is None and (target := fit_audio(client, run_id, "target", Path(d) / str(i))) is not None:
                ref, sr = target
    if ref is None:
        return None
    fig = spectrogram_comparison_figure(ref, preds, sr, title=f"{clip} ({shortest / sr:.1f} s)")
    return save_figure(fig, path)


# --- a fit's audio, as its child run logged it -------------------------------------------------------------------


def fit_audio(client: Any, run_id: str, which: str, workdir: Path, folder: str = "audio") -> tuple[Any, int] | None:
    """A fit's "pred" or "target" audio as (float32 [N], sample rate), read from MLflow; None when the run logged
    none (log_artifacts off, or the run is gone).

    A sweep's fit logs `<folder>/pred.flac` and references its clip's target, logged once on its parent run
    (tag tune.spine.TARGET_AUDIO_TAG); runs logged before that, and a search's trials (`folder` "audio/<clip>"), have
    `<folder>/pred.wav` and `<folder>/gt.wav` of their own. Stored audio is quantized (16-bit FLAC)."""
    from fewsound.data.audio import read_audio
    from tune.spine import TARGET_AUDIO_TAG

    where = workdir / run_id
    if which == "target":
        try:
            tags = client.get_run(run_id).data.tags
        except Exception:
            return None
        if TARGET_AUDIO_TAG in tags and PARENT_TAG in tags:
            paths = [(tags[PARENT_TAG], tags[TARGET_AUDIO_TAG])]
        else:
            paths = [(run_id, f"{folder}/gt.wav")]
    else:
        assert which == "pred", which
        paths = [(run_id, f"{folder}/pred.flac"), (run_id, f"{folder}/pred.wav")]
    for rid, path in paths:
        try:
            return read_audio(client.download_artifacts(rid, path, str(where)))
        except Exception:  # not logged under this name
            continue
    return None


# --- the listening page (fewsound.listen) from a sweep's runs ---------------------------------------------------

LISTEN_ARTIFACT = "report/listen.html"


def listen_tables(job: str, rows: list[dict[str, Any]], table: dict[str, Any]) -> tuple[list[Any], list[str]]:
    """(the paper-style tables for the page's header, the paper's row order). An ablation gets one table per knob
    (the paper's numbers are per knob) and its knobs' order; other sweeps their own table (`table`: build_table
    keyword arguments)."""
    from fewsound import tables
    from fewsound.ablation import KNOBS, configs, knob_tables

    if job == "kan_ablation":
        summary = [tables.build_table(kt["rows"], **kt["table"]) for kt in knob_tables(rows).values() if kt["rows"]]
        return summary, list(configs(list(KNOBS.values()), 1))
    return [tables.build_table(rows, **table)], list(table.get("label_order") or [])


def _fetch_audio(client: Any, sections: list[Any], workdir: Path) -> dict[tuple[str, int], Any]:
    """(clip, length) -> ClipAudio from the child runs' audio (`fit_audio`; sections of runs that logged no audio
    are left out). Downloads run a few at a time: each is one round trip to the server."""
    from concurrent.futures import ThreadPoolExecutor

    from fewsound.listen import ClipAudio

    # a progress bar per downloaded file would bury the sweep's output; only a default, as in tune.sweep
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # a row's audio folder: "audio" (a sweep's run is one fit), or e.g. "audio/<clip>" (a search trial's run
    # fits several clips)
    jobs = [(s, r["run_id"], r.get("audio", "audio")) for s in sections for r in s.rows]
    with ThreadPoolExecutor(max_workers=4) as pool:
        preds = list(pool.map(lambda job: fit_audio(client, job[1], "pred", workdir, job[2]), jobs))
        by_section: dict[tuple[str, int], dict[str, Any]] = {}
        folder: dict[str, str] = {}
        for (s, run_id, where), got in zip(jobs, preds):
            if got is not None and got[0].shape[0] == s.length:
                by_section.setdefault((s.clip_id, s.length), {})[run_id] = got
                folder[f"{run_id}/{s.clip_id}"] = where
        out = {}
        for s in sections:
            have = by_section.get((s.clip_id, s.length))
            if not have:
                continue
            first = next(iter(have))
            target = fit_audio(client, first, "target", workdir, folder[f"{first}/{s.clip_id}"])
            if target is not None:
                out[(s.clip_id, s.length)] = ClipAudio(target[0], {k: v[0] for k, v in have.items()}, target[1])
    return out


def listen_page(
    uri: str,
    parent_run_id: str,
    rows: list[dict[str, Any]],
    table: dict[str, Any] | None = None,
    n_clips: int | None = None,
) -> str:
    """The listening page of a sweep (fewsound.listen) as HTML: `n_clips` clips of `rows` (one per finished fit)
    with the audio of their child runs; the header from the parent run's tags and the fits' params.
    table: the sweep's build_table keyword arguments (default: what the report job would use for this sweep)."""
    from fewsound import listen

    client = _client(uri)
    parent = client.get_run(parent_run_id)
    tags = parent.data.tags
    job = tags.get(JOB_TAG, "")
    if table is None:
        table = _table_spec(job, rows)
    summary, order = listen_tables(job, rows, table)
    sections = listen.sample_sections(rows, n_clips, order)
    with tempfile.TemporaryDirectory() as d:
        audio = _fetch_audio(client, sections, Path(d))
    steps = sorted({client.get_run(s.rows[0]["run_id"]).data.params.get("fit.steps", "?") for s in sections})
    header = {
        "job": job,
        "command": tags.get(COMMAND_TAG),
        "steps": ", ".join(map(str, steps)),
        "commit": tags.get("mlflow.source.git.commit"),
        "sweep": tags.get(SWEEP_TAG),
        "parent run": parent_run_id,
        "fits": f"{len(rows)} finished of {tags.get(N_FITS_TAG, len(rows))}",
    }
    n_total = len({r["clip_id"] for r in rows})
    return listen.render_page(
        sections, audio, title=f"{job or 'sweep'}: listen", header=header, summary=summary, n_clips_total=n_total
    )


def write_listen_page(
    uri: str,
    parent_run_id: str,
    rows: list[dict[str, Any]],
    path: Path,
    table: dict[str, Any] | None = None,
    n_clips: int | None = None,
) -> Path:
    """Write the listening page to `path` and log it on the parent run as report/listen.html. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(listen_page(uri, parent_run_id, rows, table, n_clips), encoding="utf-8")
    with tempfile.TemporaryDirectory() as d:  # logged under its artifact name whatever `path` is called
        named = Path(d) / Path(LISTEN_ARTIFACT).name
        named.write_bytes(path.read_bytes())
        _client(uri).log_artifact(parent_run_id, str(named), str(Path(LISTEN_ARTIFACT).parent))
    return path


def log_listen_page(
    uri: str, parent_run_id: str, rows: list[dict[str, Any]], table: dict[str, Any], n_clips: int
) -> None:
    """The sweep driver's hook: the listening page on the parent run. The fits are already durable and logged, so
    a page that cannot be made (e.g. an artifact store that went away) is reported in one line, not raised."""
    if not rows or (n_clips is not None and n_clips < 1):
        return
    try:
        with tempfile.TemporaryDirectory() as d:
            write_listen_page(uri, parent_run_id, rows, Path(d) / "listen.html", table, n_clips)
    except Exception as e:
        print(f"warning: no listening page for sweep run {parent_run_id}: {type(e).__name__}: {e}", flush=True)
