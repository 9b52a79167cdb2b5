"""jobs/report.py on a real smoke sweep's MLflow runs: tables that parse and match the child runs' metrics, the
spectrogram comparison, and bad input (real Ray, real MLflow server)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from sweep_jobs import job


def test_report_regenerates_tables_matching_the_child_runs(home, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    report = job("report")
    assert report.main(["--smoke-test", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "| NERF |" in out and "| KAN |" in out and "MLflow UI: http://127.0.0.1:" in out

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("report-smoke")
    parent = client.search_runs([exp.experiment_id], "tags.`fewsound.role` = 'parent'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2
    by_label = {r.data.tags["fewsound.label"]: r.data.metrics for r in children}

    with open(tmp_path / "a" / "table.csv") as f:
        table = list(csv.DictReader(f))
    columns = {
        "MSE": "eval/mse",
        "PSNR": "eval/psnr",
        "LSD": "eval/lsd",
        "SI-SNR": "eval/si_snr",
        "PESQ": "eval/pesq",
        "STOI": "eval/stoi",
        "WD": "eval/wd_hf",
    }
    seen = set()
    for row in table:
        key = columns[row["metric"]]
        assert float(row["mean"]) == pytest.approx(by_label[row["INR"]][key], rel=1e-12)  # one clip: mean = value
        assert float(row["std"]) == 0.0
        seen.add((row["INR"], row["metric"]))
    assert {(lab, c) for lab in ("NERF", "KAN") for c in ("MSE", "PSNR", "LSD", "SI-SNR")} <= seen
    md = (tmp_path / "a" / "table.md").read_text()
    assert md.count("**") >= 2  # the best value of each column in bold
    # each metric column: exactly one bold cell, on the row whose child run has that column's best value
    lower_is_better = {"MSE", "LSD", "WD", "CDPAM"}
    table_lines = [line for line in md.splitlines() if line.startswith("|") and not line.startswith("|---")]
    head = [c.strip() for c in table_lines[0].strip("|").split("|")]
    body = {cells[0]: cells for cells in ([c.strip() for c in x.strip("|").split("|")] for x in table_lines[1:])}
    assert set(body) == {"NERF", "KAN"}, md
    checked = 0
    for i, column in enumerate(head):
        if column not in columns:
            continue
        bold = [label for label, cells in body.items() if cells[i].startswith("**") and cells[i].count("**") == 2]
        values = {label: by_label[label][columns[column]] for label in body}
        want = (min if column in lower_is_better else max)(values.values())
        assert len(bold) == 1 and values[bold[0]] == want, (column, bold, values)
        checked += 1
    assert checked >= 4  # at least MSE, PSNR, LSD, SI-SNR
    assert (tmp_path / "a" / "table.tex").read_text().count(r"\begin{tabular}") == 1
    # the listening page: in --out and on the parent run, a row per fit of the sweep's one clip
    page = (tmp_path / "a" / "listen.html").read_text()
    assert page.count('<tr class="fit"') == 2 and page.count("<audio") == 3
    logged_page = client.download_artifacts(parent.info.run_id, "report/listen.html", str(tmp_path / "logged"))
    assert Path(logged_page).read_text() == page
    png = tmp_path / "a" / "spectrograms.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000

    # the same sweep found as its experiment's latest, and its tables are byte-identical
    assert report.main(["--experiment", "report-smoke", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "table.csv").read_text() == (tmp_path / "a" / "table.csv").read_text()
    # and equal to what the sweep itself logged to the parent when it finished
    logged = client.download_artifacts(parent.info.run_id, "tables/table.csv", str(tmp_path))
    assert Path(logged).read_text() == (tmp_path / "a" / "table.csv").read_text()


@pytest.mark.parametrize(
    "argv, where",
    [
        (["--run-id", "0123456789abcdef"], "--run-id"),
        (["--experiment", "no-such-experiment"], "--experiment"),
        ([], "--run-id"),
    ],
)
def test_bad_input_is_a_one_line_error(home, capsys, argv, where):
    assert job("report").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {where}") and "\n" not in err
