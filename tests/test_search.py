"""jobs/search_inr.py: Optuna TPE through Ray Tune with ASHA, a parameter budget, MLflow child runs (real Ray,
real MLflow server); and the pure parts (objective, spaces, budget counting)."""

from __future__ import annotations

import csv
import io
import json
import os

import optuna
import pytest
from sweep_jobs import job

from fewsound.errors import ConfigError
from fewsound.search_space import SPACES, count_params, parse_weights, score, smallest_params, to_fit_config

BUDGET = 34_000


def test_every_space_gives_buildable_configs_and_the_paper_kan_fits_the_budget():
    for family, space in SPACES.items():
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
        for _ in range(5):
            trial = study.ask()
            space(trial)
            cfg = to_fit_config(family, trial.params, steps=10)
            assert cfg.family == family and len(cfg.inr["widths"]) == trial.params["depth"]
            assert cfg.build_inr().num_params() == count_params(family, trial.params) > 0
    paper = {
        "lr": 5e-3,
        "encoding_length": 10,
        "grid_size": 10,
        "spline_order": 2,
        "enable_scale_spline": True,
        "depth": 3,
        "width0": 48,
        "width1": 24,
        "width2": 12,
    }
    assert count_params("kan", paper) == 33_768 <= BUDGET
    # the smallest KAN of the space: 4 encoding features -> 4 -> 4 -> 1, G = 1, k = 1, no scaler: 3 per edge
    assert smallest_params("kan") == (4 * 4 + 4 * 4 + 4 * 1) * (1 + 1 + 1)


def test_objective_scores():
    assert score("psnr", {}, {"psnr": 31.0}) == 31.0
    assert score("pesq", {}, {}) == 1.0  # PESQ not applicable (no utterance): the worst score, never NaN
    mix = parse_weights("pesq=1,lsd=1")
    assert score("mix", mix, {"pesq": 4.5, "lsd": 0.0}) == pytest.approx(1.0)
    assert score("mix", mix, {"pesq": 1.0, "lsd": 4.0}) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="--mix-weights"):
        parse_weights("pesq=1,loudness=2")


def test_search_smoke_logs_trials_respects_budget_and_stops_early(home, capsys):
    from mlflow.tracking import MlflowClient

    assert job("search_inr").main(["--smoke-test"]) == 0
    out = capsys.readouterr().out
    assert "best configuration: {" in out and "| paper config |" in out and "| best trial |" in out
    assert "MLflow UI: http://127.0.0.1:" in out

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("search_inr-kan-smoke")
    parent = client.search_runs([exp.experiment_id], "tags.`fewsound.role` = 'parent'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trials = [r for r in children if r.data.tags["fewsound.role"] == "trial"]
    baseline = [r for r in children if r.data.tags["fewsound.role"] == "baseline"]
    assert len(trials) == 6 and len(baseline) == 1
    assert baseline[0].data.metrics["model/params"] == 33_768 and baseline[0].info.status == "FINISHED"
    # no run is left RUNNING; every fitted configuration is within the budget
    assert {r.info.status for r in trials} <= {"FINISHED", "KILLED"}
    assert all(r.data.metrics["model/params"] <= BUDGET for r in children)
    # over-budget suggestions were made (the space allows 100k+ parameters), rejected, and never fitted
    m = parent.data.metrics
    assert m["search/rejected_over_budget"] >= 1 and m["search/trials"] == 6
    rejected = list(
        csv.DictReader(
            io.StringIO(open(client.download_artifacts(parent.info.run_id, "search/rejected_over_budget.csv")).read())
        )
    )
    assert len(rejected) == m["search/rejected_over_budget"]
    assert all(int(r["num_params"]) > BUDGET for r in rejected)
    fitted = [{k[len("search.") :]: v for k, v in r.data.params.items() if k.startswith("search.")} for r in trials]
    assert not any({k: str(v) for k, v in r.items() if k != "num_params"} in fitted for r in rejected)
    # ASHA stopped at least one trial early: its run is KILLED, tagged, with fewer objective points
    stopped = [r for r in trials if r.info.status == "KILLED"]
    assert stopped and m["search/stopped_early"] == len(stopped) >= 1
    for r in stopped:
        assert r.data.tags["fewsound.stopped_early"].startswith("ASHA at step")
        assert "eval/psnr" not in r.data.metrics  # never reached the end
    done = [r for r in trials if r.info.status == "FINISHED"]
    curve = client.get_metric_history(done[0].info.run_id, "search/objective")
    assert [p.step for p in sorted(curve, key=lambda p: p.step)] == [2, 4, 6, 8]  # 4 chunks of 2 steps
    # the best configuration is the best finished trial, logged on the parent
    best = json.load(open(client.download_artifacts(parent.info.run_id, "search/best_config.json")))
    finals = {r.info.run_id: r.data.metrics["search/objective"] for r in done}
    assert best["objective"] == pytest.approx(max(finals.values()))
    assert parent.data.tags["fewsound.best_run_id"] == max(finals, key=finals.get)


@pytest.mark.parametrize(
    "argv, where",
    [
        (["--family", "mlp"], "--family"),
        (["--objective", "loudness"], "--objective"),
        (["--objective", "mix", "--mix-weights", "pesq"], "--mix-weights"),
        (["--max-params", "50"], "--max-params"),
        (["--steps", "5", "--chunks", "10"], "--trials/--chunks/--steps"),
    ],
)
def test_bad_input_is_a_one_line_error(home, capsys, argv, where):
    assert job("search_inr").main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {where}") and "\n" not in err
