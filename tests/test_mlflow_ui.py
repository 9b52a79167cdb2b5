"""benchmarks/mlflow_ui.py on a small experiment of its own, in a real headless Chromium against a real MLflow server:
the fits' runs page renders its rows, the summary experiment lists every summary run with the best row first, the
comparison page shows the rows' statistics, and the fits' page sorted by PESQ shows the best fits first."""

from __future__ import annotations

import json
import sys

import pytest
from support import REPO  # tests/support.py

RUNS = 120


@pytest.mark.system
def test_the_ui_benchmark_sees_summaries_comparison_and_best_fits_in_chromium(processes, tmp_path):
    out = tmp_path / "ui.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "mlflow_ui.py"), "--runs", str(RUNS), "--out", str(out)]
    done = processes.run(cmd + ["--timeout", "90"], timeout=600, cwd=REPO)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    r = json.loads(out.read_text())
    assert r["fits"] == RUNS and r["runs_in_experiment"] == RUNS + 1  # the fits and their parent
    assert r["summary_experiment"] == f"ui-bench-{RUNS} summary" and r["summary_runs"] == 4
    assert r["headline_metric"] == "eval/pesq" and r["every_page_ready"] is True
    pages = r["pages"]
    for name in ("fits", "summaries", "compare", "best_fits"):
        assert pages[name]["first_visit"]["ms"] > 0 and pages[name]["cached"]["ms"] > 0, (name, pages[name])
    # the benchmark's configurations get better from NERF to RFF: RFF's row first, then its best fits
    assert pages["summaries"]["best_first"] == "summary: RFF 1.5 s audio"
    assert "summary: RFF 1.5 s audio" in pages["summaries"]["first_visit"]["first_rows"][0]
    assert len(pages["summaries"]["first_visit"]["first_rows"]) == 4
    best = pages["best_fits"]["best"]
    assert all(name.startswith("rff-") for name in best)
    assert all(b in row for b, row in zip(best, pages["best_fits"]["first_visit"]["first_rows"]))
    assert f"fits page under 3 s: {r['fits_page_under_goal']}" in done.stdout
