"""A sweep's summary runs (tune.sweep.summary): one run per row of its table, in the experiment "<experiment>
summary", with the table's own mean, std, 95% interval and clip count per metric; a re-run adds none, and a row
that changes is updated in place. Real local Ray, real MLflow server over HTTP, the built-in corpus's speech."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import pytest

from fewsound.tables import COLUMNS

LENGTH = 4096
KEY = {title: key for title, key, _ in COLUMNS}
SORT = "eval/si_snr/mean"  # the headline metric of these sweeps (no PESQ computed), best first


@pytest.fixture(scope="module")
def ray_local(env):
    """A local Ray of this module's own (2 CPUs), started in the module's home."""
    import ray

    from tune.ray_env import init_ray, quiet_defaults

    quiet_defaults()
    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _tasks():
    from fewsound.fit import FitConfig
    from fewsound.plan import FitTask
    from tune.jobs import corpus_clips, resolve_corpus

    corpus = resolve_corpus(None, LENGTH)
    clips = corpus_clips(corpus, "3", "speech")
    tasks = [FitTask(FitConfig(family=f, steps=2), c.clip_id, c.kind, LENGTH, f.upper()) for f in ("nerf", "kan")
             for c in clips]  # fmt: skip
    return corpus, tasks


def _sweep(corpus, tasks):
    from tune.sweep import run_sweep

    return run_sweep(
        "fit_inrs",
        tasks,
        corpus=corpus,
        experiment="summary-runs",
        metrics=("mse", "psnr", "si_snr"),
        log_artifacts=False,
        listen_clips=0,
        table={"title": "smoke", "label_order": ["NERF", "KAN"]},
    )


def _summaries(client, s):
    from tune.spine import SWEEP_PARENT_TAG, search_runs, tag_filter
    from tune.sweep.summary_runs import SUMMARY_FILTER

    exp = client.get_experiment_by_name("summary-runs summary")
    assert exp is not None and exp.experiment_id == s.summary_experiment_id
    return search_runs(
        client, exp.experiment_id, f"{tag_filter(SWEEP_PARENT_TAG, s.parent_run_id)} and {SUMMARY_FILTER}"
    )


def test_a_sweep_logs_one_summary_run_per_table_row_with_the_tables_numbers_and_a_rerun_adds_none(
    ray_local, env, tmp_path, capsys
):
    from mlflow.tracking import MlflowClient

    from fewsound.tracking import PARENT_TAG
    from tune.spine import NOTE_TAG, ROLE_TAG, SUMMARY_TAG

    corpus, tasks = _tasks()
    s = _sweep(corpus, tasks)
    assert (s.done, s.failed) == (6, 0)
    out = capsys.readouterr().out
    client = MlflowClient(tracking_uri=env[1])

    runs = _summaries(client, s)
    assert sorted(r.info.run_name for r in runs) == ["summary: KAN 4096 samples", "summary: NERF 4096 samples"]
    assert {r.info.status for r in runs} == {"FINISHED"} and {r.data.tags[ROLE_TAG] for r in runs} == {"summary"}
    assert all(PARENT_TAG not in r.data.tags for r in runs)  # the fits' parent keeps fits only
    kids = client.search_runs([s.experiment_id], f"tags.`{PARENT_TAG}` = '{s.parent_run_id}'", max_results=100)
    assert len(kids) == 6

    # the numbers are the parent's table.csv's, row by row and metric by metric
    d = Path(client.download_artifacts(s.parent_run_id, "tables", str(tmp_path)))
    table = list(csv.DictReader(io.StringIO((d / "table.csv").read_text())))
    by_row = {r.data.tags[SUMMARY_TAG]: r for r in runs}
    assert set(by_row) == {f"{t['group']} | {t['INR']}" for t in table} == set(s.summary_runs)
    for t in table:
        m, key = by_row[f"{t['group']} | {t['INR']}"].data.metrics, KEY[t["metric"]]
        assert m[f"{key}/mean"] == pytest.approx(float(t["mean"]), rel=1e-12)
        assert m[f"{key}/std"] == pytest.approx(float(t["std"]), rel=1e-12)
        assert m[f"{key}/ci95_low"] == pytest.approx(float(t["ci_low"]), rel=1e-12)
        assert m[f"{key}/ci95_high"] == pytest.approx(float(t["ci_high"]), rel=1e-12)
        assert m[f"{key}/n"] == int(t["n"]) == 3
        assert m[f"{key}/ci95_low"] < m[f"{key}/mean"] < m[f"{key}/ci95_high"]
    assert {t["metric"] for t in table} == {"MSE", "PSNR", "SI-SNR"}
    note = by_row[f"{table[0]['group']} | KAN"].data.tags[NOTE_TAG]
    assert "| SI-SNR (higher is better) |" in note and "The fits of this row" in note
    # the description ranks the row's fits: the KAN fits by SI-SNR, best first
    kan = sorted(
        (r for r in kids if r.data.tags["fewsound.family"] == "kan"), key=lambda r: -r.data.metrics["eval/si_snr"]
    )
    listed = [line.split("[")[1].split("]")[0] for line in note.splitlines() if line[:3] in ("1. ", "2. ", "3. ")]
    assert listed == [r.info.run_name for r in kan]

    # the sweep says where they are; the parent's description links them
    where = "in MLflow experiment 'summary-runs summary'"
    assert f"2 summary runs (mean and 95% interval over clips per table row) {where}: {s.summary_ui_url(SORT)}" in out
    assert f"the best fits by eval/si_snr: {s.fits_ui_url('eval/si_snr')}" in out
    assert s.summary_ui_url(SORT).endswith(
        "/runs?workflowType=machine_learning&orderByKey=metrics.%60eval%2Fsi_snr%2Fmean%60&orderByAsc=false"
    )
    assert s.fits_ui_url("eval/mse").endswith("orderByAsc=true")  # lower is better
    parent_note = client.get_run(s.parent_run_id).data.tags[NOTE_TAG]
    assert s.compare_ui_url() in parent_note and s.fits_ui_url("eval/si_snr") in parent_note

    # a re-run of the finished sweep: the same summary runs, not one more, not rewritten
    again = _sweep(corpus, tasks)
    assert (again.skipped, again.done) == (6, 0)
    runs2 = _summaries(client, again)
    assert {r.info.run_id for r in runs2} == {r.info.run_id for r in runs}
    assert {r.info.run_id: r.info.end_time for r in runs2} == {r.info.run_id: r.info.end_time for r in runs}
    assert all(len(client.get_metric_history(r.info.run_id, "eval/psnr/mean")) == 1 for r in runs2)


def test_summary_runs_are_updated_in_place_when_a_row_changes_and_deleted_when_it_leaves(env):
    """log_summary_runs on a table whose KAN row lost a clip and whose NERF row is gone: KAN's run gets the new
    numbers (same run), NERF's run is deleted."""
    from mlflow.tracking import MlflowClient

    from fewsound import tables
    from fewsound.tracking import MlflowRun
    from tune.sweep.result import SweepSummary
    from tune.sweep.summary_runs import log_summary_runs

    uri = env[1]
    rows = [{"label": lab, "length": LENGTH, "clip_id": f"c{i}", "eval/psnr": 20.0 + i + 5 * (lab == "KAN")}
            for lab in ("NERF", "KAN") for i in range(3)]  # fmt: skip
    parent = MlflowRun("summary-update", uri=uri, run_name="parent")
    s = SweepSummary("sid", "summary-update", parent.run_id, uri, 6, 0, 6, 0, 0.0, {}, rows,
                     experiment_id=parent.experiment_id)  # fmt: skip
    exp_id, first = log_summary_runs(parent, s, tables.build_table(rows, title="t"))
    assert len(first) == 2
    kan = [r for r in rows if r["label"] == "KAN"][:2]
    s2 = dataclasses.replace(s, rows=kan)
    exp_id2, second = log_summary_runs(parent, s2, tables.build_table(kan, title="t"))
    assert exp_id2 == exp_id and second == {k: v for k, v in first.items() if "KAN" in k}
    client = MlflowClient(tracking_uri=uri)
    m = client.get_run(second["4096 samples | KAN"]).data.metrics
    assert m["eval/psnr/mean"] == pytest.approx(25.5) and m["eval/psnr/n"] == 2
    assert client.get_run(first["4096 samples | NERF"]).info.lifecycle_stage == "deleted"
