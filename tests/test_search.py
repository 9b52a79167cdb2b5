"""jobs/search_inr.py: Optuna TPE through Ray Tune with ASHA, starting from the paper's configuration, under a
parameter budget, MLflow child runs and the listening page (real Ray, real MLflow server, real Chromium); and the
pure parts (objective, spaces, budget-aware sampling, start points). Resume after a kill: test_search_resume.py."""

from __future__ import annotations

import csv
import io
import json
import os
import random
from pathlib import Path

import optuna
import pytest
from sweep_jobs import job

from fewsound.errors import ConfigError
from fewsound.search_space import (
    SPACES,
    count_params,
    encode_point,
    parse_families,
    parse_start_from,
    parse_weights,
    score,
    smallest_params,
    start_point,
    suggest_point,
    to_fit_config,
)

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


def test_budget_aware_sampling_spends_the_budget():
    """Under a budget, TPE's suggestions land between half the budget and the budget (widths derived from a
    parameter target); the unbudgeted space's independent widths land mostly on small networks."""
    rng = random.Random(0)
    for families in (["kan"], ["kan", "siren", "wire"]):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
        counts = []
        for _ in range(30):
            trial = study.ask()
            point = suggest_point(trial, families, BUDGET)
            counts.append(count_params(point["family"], point))
            study.tell(trial, rng.random())
        within = [n for n in counts if BUDGET // 2 <= n <= BUDGET]
        assert len(within) >= 0.9 * len(counts), counts
        assert max(counts) <= BUDGET
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    free = []
    for _ in range(30):
        trial = study.ask()
        free.append(count_params("kan", suggest_point(trial, ["kan"])))
    assert sum(BUDGET // 2 <= n <= BUDGET for n in free) < 0.5 * len(free), free


def test_start_points_are_the_papers_configurations_and_the_users():
    assert count_params("kan", start_point("kan")) == 33_768
    assert count_params("nerf", start_point("nerf")) == 33_261
    [user] = parse_start_from(["family=kan,grid_size=16,widths=64x32x16,lr=0.004"])
    point = start_point("kan", {k: v for k, v in user.items() if k != "family"})
    assert point["grid_size"] == 16 and point["lr"] == 0.004 and (point["width0"], point["width2"]) == (64, 16)
    assert point["spline_order"] == start_point("kan")["spline_order"]  # the rest is the paper's
    # Optuna's parameters for a start point: its knobs, and under a budget its fraction of it, depth and taper
    enc = encode_point(start_point("kan"), ["kan"], BUDGET)
    assert enc["param_fraction"] == pytest.approx(33_768 / BUDGET) and enc["taper"] == pytest.approx(0.5)
    assert encode_point(start_point("kan"), ["kan", "nerf"], None)["kan.width0"] == 48
    assert parse_families("any") == list(SPACES) and parse_families("kan,siren") == ["kan", "siren"]
    with pytest.raises(ConfigError, match="--family"):
        parse_families("kan,mlp")


def test_comparison_says_when_the_papers_configuration_stays_best():
    from tune.search import SearchContext, SearchSummary, comparison_markdown

    paper = {
        "number": 0,
        "family": "kan",
        "start_point": "paper",
        "objective": 2.6,
        "num_params": 33_768,
        "params": start_point("kan"),
    }
    other = dict(paper, number=5, start_point=None, objective=2.1, num_params=20_000)
    ctx = SearchContext(("kan",), "builtin", ("a",), "speech", 16_384, 10, 2, "pesq", {}, 0, "x", "r", "u")
    s = SearchSummary("x", "r", "u", "max", 6, 2, 4, 0, 0, 0, paper, [paper], "", 1.0)
    text = comparison_markdown(s, ctx)
    assert s.paper_stays_best and "'paper config' stays best" in text and "| paper config | kan | 2.6 |" in text
    s.best = other
    assert not s.paper_stays_best and "stays best" not in comparison_markdown(s, ctx)


def _search_runs(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    parent = client.search_runs([exp.experiment_id], "tags.`fewsound.role` = 'parent'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, children


@pytest.mark.integration
def test_search_smoke_starts_from_the_paper_respects_budget_stops_early_and_reports(home, capsys, tmp_path):
    from browser import Chromium
    from mlflow.tracking import MlflowClient
    from test_listen_browser import CHECK_JS, LENGTH, SR

    assert job("search_inr").main(["--smoke-test"]) == 0
    out = capsys.readouterr().out
    assert "best configuration: {" in out and "| paper config | kan |" in out
    assert "MLflow UI: http://127.0.0.1:" in out

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent, children = _search_runs(client, "search_inr-kan-smoke")
    assert len(children) == 6 and {r.info.status for r in children} <= {"FINISHED", "KILLED"}
    # the paper's configuration is the first trial, and ASHA never stopped it
    [paper] = [r for r in children if r.data.tags["fewsound.role"] == "start_point"]
    assert paper.data.tags["fewsound.start_point"] == "paper" and paper.info.status == "FINISHED"
    assert paper.data.metrics["model/params"] == 33_768
    # every fitted configuration is within the budget
    assert all(r.data.metrics["model/params"] <= BUDGET for r in children)
    m = parent.data.metrics
    assert m["search/trials"] == 6 and m["search/paper_objective"] == paper.data.metrics["search/objective"]
    # ASHA stopped at least one sampled trial early: its run is KILLED, tagged, with fewer objective points
    stopped = [r for r in children if r.info.status == "KILLED"]
    assert stopped and m["search/stopped_early"] == len(stopped) >= 1
    for r in stopped:
        assert r.data.tags["fewsound.stopped_early"].startswith("ASHA at step")
        assert "eval/psnr" not in r.data.metrics  # never reached the end
    done = [r for r in children if r.info.status == "FINISHED"]
    curve = client.get_metric_history(done[0].info.run_id, "search/objective")
    assert [p.step for p in sorted(curve, key=lambda p: p.step)] == [2, 4, 6, 8]  # 4 chunks of 2 steps
    # the best is over every trial that ran every step, the paper's configuration included: never below it
    best = json.load(open(client.download_artifacts(parent.info.run_id, "search/best_config.json")))
    finals = {r.info.run_id: r.data.metrics["search/objective"] for r in done}
    assert best["objective"] == pytest.approx(max(finals.values()))
    assert best["objective"] >= paper.data.metrics["search/objective"]
    assert parent.data.tags["fewsound.best_run_id"] == max(finals, key=finals.get)
    trials = list(
        csv.DictReader(io.StringIO(open(client.download_artifacts(parent.info.run_id, "search/trials.csv")).read()))
    )
    assert len(trials) == 6 and [t["start_point"] for t in trials].count("paper") == 1
    # a trial ASHA stopped keeps the objective it had when stopped (TPE ranks it by that; the plot shows it)
    assert all(t["objective"] not in ("", None) for t in trials if t["outcome"] == "stopped_early")
    # what mattered, and quality against parameters
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "search/plots")}
    assert "search/plots/quality_vs_params.png" in logged
    imp = json.load(open(client.download_artifacts(parent.info.run_id, "search/importances.json")))
    assert set(imp["importances"]) | set(imp["not_computed"]) == {"ped_anova", "fanova"}
    # an evaluator gives nothing only for too few trials; one that crashed (any other reason) fails here
    too_few = f"{len(done)} trials ran every step (needs 3 or more)"
    assert all(reason == too_few for reason in imp["not_computed"].values()), imp["not_computed"]
    assert bool(imp["importances"]) == (len(done) >= 3), (len(done), imp)
    sampled = {k.removeprefix("search.") for r in children for k in r.data.params if k.startswith("search.")}
    # under a budget Optuna also samples the share of it and the taper, and the runs log the widths they give
    # (fewsound.search_space.suggest_point): Optuna's parameters too (this part runs only when 3 trials ran every
    # step, which ASHA decides)
    sampled |= {"param_fraction", "taper"}
    for name, shares in imp["importances"].items():  # shares of the sampled parameters, summing to one
        assert shares and set(shares) <= sampled, (name, shares, sampled)
        assert sum(shares.values()) == pytest.approx(1.0) and min(shares.values()) >= 0, (name, shares)

    # the listening page: the paper's configuration and the best trial(s), playable
    page = Path(client.download_artifacts(parent.info.run_id, "report/listen.html", str(tmp_path)))
    html = page.read_text()
    assert 'data-label="paper config"' in html and 'data-label="best (trial' in html
    with Chromium() as browser:
        result = browser.evaluate(page.resolve().as_uri(), CHECK_JS)
    media = result["media"]
    assert media[0]["row"] == "target" and "paper config" in [m["row"] for m in media] and len(media) >= 3
    for m in media:
        assert m["error"] is None and m["samples"] == LENGTH, m
        assert m["duration"] == pytest.approx(LENGTH / SR, abs=2e-3), m
    assert result["images"] and all(im["height"] > 0 for im in result["images"])


def test_importances_are_computed_and_a_crashing_evaluator_is_reported(monkeypatch):
    """tune.search.report.importances on a study whose objective depends on one parameter: both evaluators rank
    it first; with too few trials neither runs; an evaluator that raises is reported with its error, not skipped
    silently (the search test above fails on such a reason)."""
    from tune.search import report as search_report

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: 10 * t.suggest_float("x", 0, 1) + 0.01 * t.suggest_float("y", 0, 1), n_trials=16)
    imp, why = search_report.importances(study)
    assert why == {} and set(imp) == {"ped_anova", "fanova"}
    for shares in imp.values():
        assert max(shares, key=shares.get) == "x" and sum(shares.values()) == pytest.approx(1.0)
    few = optuna.create_study(direction="maximize")
    few.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert search_report.importances(few) == ({}, dict.fromkeys(imp, "2 trials ran every step (needs 3 or more)"))

    class Broken(optuna.importance.FanovaImportanceEvaluator):
        def evaluate(self, *args, **kwargs):
            raise RuntimeError("evaluator crashed")

    monkeypatch.setitem(search_report.EVALUATORS, "fanova", Broken)
    imp, why = search_report.importances(study)
    assert set(imp) == {"ped_anova"} and why == {"fanova": "RuntimeError: evaluator crashed"}


def test_search_over_any_family_starts_from_each_familys_paper_configuration(home, capsys):
    from mlflow.tracking import MlflowClient

    argv = ["--smoke-test", "--family", "any", "--trials", "6", "--listen-clips", "0"]
    assert job("search_inr").main(argv) == 0
    out = capsys.readouterr().out
    assert "start point 'paper rff' has 39,201 parameters, over the budget of 34,000: not fitted" in out
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent, children = _search_runs(client, "search_inr-any-smoke")
    starts = {r.data.tags["fewsound.start_point"]: r for r in children if r.data.tags["fewsound.role"] == "start_point"}
    assert set(starts) == {f"paper {f}" for f in ("kan", "nerf", "siren", "finer", "wire")}
    assert all(r.info.status == "FINISHED" for r in starts.values())
    assert len(children) == 6 and all(r.data.metrics["model/params"] <= BUDGET for r in children)
    best = json.load(open(client.download_artifacts(parent.info.run_id, "search/best_config.json")))
    finished = [r.data.metrics["search/objective"] for r in children if r.info.status == "FINISHED"]
    assert best["objective"] == pytest.approx(max(finished)) and best["family"] in SPACES


@pytest.mark.parametrize(
    "argv, where",
    [
        (["--family", "mlp"], "--family"),
        (["--start-from", "grid_size=abc,bogus=1"], "--start-from"),
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


def test_suggestions_over_the_budget_are_told_pruned_and_never_reach_tune():
    from optuna.trial import TrialState

    from tune.search.study import StudySearcher, fitted_trials

    budget = 400  # a few of the smallest KANs fit; most suggestions (even at the narrowest widths) do not
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    searcher = StudySearcher(study, ["kan"], budget, metric="objective", mode="max", on_change=lambda: None)
    configs = [searcher.suggest(f"t{i}") for i in range(3)]
    assert all(count_params("kan", c) <= budget for c in configs)
    rejected = [t for t in study.get_trials() if t.user_attrs.get("outcome") == "rejected"]
    assert rejected and all(t.state == TrialState.PRUNED and t.user_attrs["num_params"] > budget for t in rejected)
    searcher.on_trial_complete("t0", {"objective": 3.0, "final": 1, "steps": 8, "mlflow_run_id": "r"})
    searcher.on_trial_result("t1", {"objective": 1.0, "final": 0, "steps": 4})
    searcher.on_trial_complete("t1", {"objective": 1.0, "final": 0, "steps": 4})
    searcher.on_trial_complete("t2", None, error=True)
    outcomes = {t.user_attrs["outcome"]: t.state for t in fitted_trials(study)}
    assert outcomes == {"finished": TrialState.COMPLETE, "stopped_early": TrialState.PRUNED, "failed": TrialState.FAIL}
    assert study.best_value == 3.0


@pytest.mark.integration
def test_asha_never_stops_a_start_point(home, tmp_path):
    """On real Tune: trials run one at a time, three good ones set ASHA's rungs, then a bad sampled trial is
    stopped at the first rung while an equally bad start point runs every iteration."""
    from ray import tune

    from tune.ray_env import init_ray
    from tune.search.study import START_KEY, StartPointsRunToEnd

    quality = [1.0, 0.9, 0.8, 0.0, 0.0]  # the last one is the start point

    def trainable(config):
        for i in range(4):
            tune.report({"objective": quality[config["i"]], "iteration": i + 1})

    init_ray()
    grid = tune.Tuner(
        trainable,
        param_space={
            "i": tune.grid_search(list(range(len(quality)))),
            START_KEY: tune.sample_from(lambda spec: "paper" if spec.config.i == len(quality) - 1 else None),
        },
        tune_config=tune.TuneConfig(
            metric="objective",
            mode="max",
            scheduler=StartPointsRunToEnd(time_attr="training_iteration", max_t=4, grace_period=1, reduction_factor=2),
            max_concurrent_trials=1,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    ).fit()
    reached = {r.config["i"]: r.metrics["iteration"] for r in grid}
    assert grid[0].config[START_KEY] is None and {r.config[START_KEY] for r in grid} == {None, "paper"}
    assert reached[3] < 4  # ASHA stops a bad sampled trial
    assert reached[4] == 4  # but not the start point, as bad


def test_resume_settles_trials_in_flight_and_enqueues_the_start_points_left():
    """A killed driver leaves trials RUNNING: one whose run ran every step (the driver never heard) is re-added as
    finished, one ASHA stopped as stopped early, one cut off is closed uncounted (refitted); the paper's start
    point, which had not run, is enqueued."""
    from optuna.trial import TrialState

    from tune.search.study import START_KEY, fitted_trials, prepare_resume

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        trial = study.ask()
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        trial.set_user_attr("point", json.dumps({"family": "kan", "lr": trial.params["lr"]}))
    records = {0: {"outcome": "finished", "value": 2.5, "mlflow_run_id": "a"}, 1: {"outcome": "stopped_early"}}
    paper = start_point("kan")
    refit = prepare_resume(study, [("paper", paper)], lambda p: {"lr": p["lr"]}, records.get)
    assert refit == 1
    counted = {t.user_attrs["outcome"]: t for t in fitted_trials(study)}
    assert set(counted) == {"finished", "stopped_early"} and counted["finished"].value == 2.5
    assert (
        counted["finished"].params == study.trials[0].params and counted["finished"].user_attrs["mlflow_run_id"] == "a"
    )
    assert not study.get_trials(states=(TrialState.RUNNING,))
    [waiting] = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.user_attrs[START_KEY] == "paper" and json.loads(waiting.user_attrs["point"]) == paper
    # a second resume enqueues nothing more: the paper's point is waiting
    assert prepare_resume(study, [("paper", paper)], lambda p: {"lr": p["lr"]}) == 0
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1
