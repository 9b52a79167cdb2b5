"""The KAN ablation: the paper's rows and parameter counts, the knob tables, and the job's smoke run end to end
(real Ray, real MLflow server), with the report job regenerating the same tables from the runs."""

from __future__ import annotations

import csv
import os

import pytest
from sweep_jobs import job

from fewsound.ablation import BASE_LABEL, KNOBS, check_param_counts, configs, knob_rows, knob_tables, paper_params


def test_every_row_has_the_papers_parameter_count():
    assert check_param_counts(list(KNOBS.values())) == []
    counts = {
        (k.name, k.label(v)): k.fit_config(v, 1, 0).build_inr().num_params() for k in KNOBS.values() for v in k.values
    }
    assert len(counts) == 31  # 7 + 7 + 5 + 5 + 5 + 2 rows, as printed in Tables 7-10, 16, 17
    assert counts[("encoding_length", "2")] == 23_016 and counts[("layers", "[96, 48, 24]")] == 102_480
    assert counts[("grid_size", "17")] == 46_620 and counts[("scale_spline", "False")] == 28_860
    assert all(counts[key] == paper_params(KNOBS[key[0]], key[1]) for key in counts)


def test_base_is_fitted_once_and_shared_by_every_knob_table():
    cfgs = configs(list(KNOBS.values()), steps=10)
    assert len(cfgs) == 26  # 31 rows, the base counted once
    assert cfgs[BASE_LABEL].build_inr().num_params() == 31_080 and cfgs[BASE_LABEL].resolved_lr == 5e-3
    assert cfgs["layers=[24, 12, 6]"].inr["widths"] == (24, 12, 6) and cfgs["lr=0.001"].resolved_lr == 1e-3
    assert {k.name: lab for k, lab in knob_rows(BASE_LABEL)} == {
        "encoding_length": "8",
        "layers": "[48, 24, 12]",
        "spline_order": "2",
        "grid_size": "10",
        "lr": "0.005",
        "scale_spline": "True",
    }
    rows = [
        {"label": BASE_LABEL, "length": 32_768, "eval/psnr": 30.0},
        {"label": "grid_size=5", "length": 32_768, "eval/psnr": 20.0},
        {"label": "spline_order=3", "length": 65_536, "eval/psnr": 25.0},
    ]
    tables = knob_tables(rows)
    assert set(tables) == {"grid_size", "spline_order"}  # knobs not varied in the sweep get no table
    assert [r["label"] for r in tables["grid_size"]["rows"]] == ["10", "5"]
    assert tables["spline_order"]["table"]["paper_table"] == {32_768: 9, 65_536: 14}
    # the paper's numbers beside ours: Table 10 for the 1.5 s grid-size rows, Table 14 for 3 s spline order 3
    from fewsound.tables import build_table

    grid = build_table(tables["grid_size"]["rows"], **tables["grid_size"]["table"]).groups[0].rows
    assert [(r.label, r.paper["PSNR"][0]) for r in grid] == [("5", 37.33), ("10", 40.10)]  # the paper's row order
    order = build_table(tables["spline_order"]["rows"], **tables["spline_order"]["table"]).groups
    assert [g.name for g in order] == ["1.5 s audio", "3 s audio"]
    assert order[1].rows[0].label == "3" and order[1].rows[0].paper["PESQ"] == (2.56, None)


def test_kan_ablation_smoke_logs_knob_tables_and_plot_and_report_regenerates_them(home, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    kan_ablation, report_job = job("kan_ablation"), job("report")
    assert kan_ablation.main(["--smoke-test"]) == 0
    out = capsys.readouterr().out
    assert "MLflow UI: http://127.0.0.1:" in out and "### KAN: scale spline" in out
    assert "| False | 28,860 |" in out and "| True | 31,080 |" in out  # paper's counts, rows labelled as in Table 17

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("kan_ablation-smoke")
    parent = client.search_runs([exp.experiment_id], "tags.`fewsound.role` = 'parent'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["fewsound.label"] for r in children) == ["base", "scale_spline=False"]
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "tables/scale_spline")}
    assert {"tables/scale_spline/table.md", "tables/scale_spline/table.tex", "tables/scale_spline/table.csv"} <= logged
    assert [f.path for f in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/quality_vs_params.png"]
    png = client.download_artifacts(parent.info.run_id, "plots/quality_vs_params.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # the report job, from MLflow alone, writes the same knob table the sweep logged
    assert report_job.main(["--run-id", parent.info.run_id, "--out", str(tmp_path / "rep")]) == 0
    sweep_md = open(client.download_artifacts(parent.info.run_id, "tables/scale_spline/table.md", str(tmp_path))).read()
    assert (tmp_path / "rep" / "ablation" / "scale_spline" / "table.md").read_text() == sweep_md
    assert (tmp_path / "rep" / "ablation" / "quality_vs_params.png").stat().st_size > 10_000
    with open(tmp_path / "rep" / "ablation" / "scale_spline" / "table.csv") as f:
        table = list(csv.DictReader(f))
    psnr = {r["Scale Spline"]: float(r["mean"]) for r in table if r["metric"] == "PSNR"}
    by_label = {r.data.tags["fewsound.label"]: r.data.metrics["eval/psnr"] for r in children}
    assert psnr == pytest.approx({"True": by_label["base"], "False": by_label["scale_spline=False"]})


def test_bad_knob_is_a_one_line_error(home, capsys):
    kan_ablation = job("kan_ablation")
    assert kan_ablation.main(["--knobs", "grid_size,colour"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --knobs") and "colour" in err and "\n" not in err
