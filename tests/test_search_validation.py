"""jobs/search_inr.py with held-out validation, end to end on the built-in corpus (real Ray, real MLflow server):
the refits are child runs of the search's parent on clips no trial used, the parent gets the table and the plot,
the output ends with the verdict, and a re-run refits nothing."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
from sweep_jobs import job

from fewsound.search_space import start_point
from tune.search.heldout import configurations, recording, validation_tasks
from tune.search.results import SearchSummary
from tune.search.study import START_KEY
from tune.spine import FIT_KEY_TAG, SWEEP_TAG

ARGV = [
    "--smoke-test",
    "--trials", "4",
    "--listen-clips", "0",
    "--experiment", "search-heldout-test",
    "--validate-top", "1",
    "--validate-clips", "6",
]  # fmt: skip


@pytest.mark.integration
def test_search_with_heldout_validation_refits_on_unseen_clips_under_the_parent_and_says_a_verdict(home, capsys):
    from mlflow.tracking import MlflowClient

    assert job("search_inr").main(ARGV) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "held-out validation: " in out and "held-out speech clips of builtin:inr-1.5s-x10" in out
    verdict = [x for x in lines if x.startswith("VERDICT: ")]
    assert len(verdict) == 1 and lines.index(verdict[0]) >= len(lines) - 8  # among the job's last lines
    assert lines[-1].startswith("(Wilcoxon signed-rank") or "itself" in verdict[0]

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("search-heldout-test")
    [parent] = client.search_runs([exp.experiment_id], "tags.`fewsound.role` = 'parent'")
    pid = parent.info.run_id
    searched = parent.data.params["clips"].split(",")
    kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}'", max_results=1000)
    refits = [r for r in kids if r.data.tags.get(SWEEP_TAG, "").startswith("search_inr-heldout-")]
    trials = [r for r in kids if "fewsound.optuna_trial" in r.data.tags]
    assert len(trials) == 4 and len(refits) == len(kids) - 4

    clips = json.load(open(client.download_artifacts(pid, "validation/clips.json")))
    assert clips["searched"] == searched and len(clips["heldout"]) == 6
    # held out: no searched clip, nor any clip of a searched recording
    assert not {recording(c) for c in clips["heldout"]} & {recording(c) for c in searched}
    configs = list(clips["configurations"])
    assert configs[0] == "paper config" and 1 <= len(configs) <= 2
    assert len(refits) == 6 * len(configs) and all(r.info.status == "FINISHED" for r in refits)
    assert {r.data.params["clip_id"] for r in refits} == set(clips["heldout"])
    assert {r.data.tags["fewsound.label"] for r in refits} == set(configs)
    assert all(r.data.params["fit.steps"] == "8" and r.data.params["clip.length"] == "16384" for r in refits)

    logged = {f.path for f in client.list_artifacts(pid, "validation")}
    assert logged == {f"validation/{n}" for n in ("clips.json", "heldout.csv", "heldout.md", "intervals.png")}
    assert "tables/table.md" in {f.path for f in client.list_artifacts(pid, "tables")}
    table = list(csv.DictReader(io.StringIO(open(client.download_artifacts(pid, "validation/heldout.csv")).read())))
    psnr = [r for r in table if r["metric"] == "PSNR"]
    assert [r["configuration"] for r in psnr] == configs and all(int(r["n"]) == 6 for r in psnr)
    assert float(psnr[0]["ci_low"]) < float(psnr[0]["mean"]) < float(psnr[0]["ci_high"])
    if len(configs) == 2:  # the best trial against the paper's configuration on the same 6 clips
        assert int(psnr[1]["pairs"]) == 6 and (psnr[1]["p"] != "" or "too few" in psnr[1]["note"])
    md = open(client.download_artifacts(pid, "validation/heldout.md")).read()
    assert verdict[0] in md and "Wilcoxon signed-rank" in md

    # the same command again: every trial and every refit is finished, nothing is refitted
    assert job("search_inr").main(ARGV) == 0
    again = capsys.readouterr().out
    assert f"{6 * len(configs)} fits: {6 * len(configs)} already finished, 0 to run" in again
    assert [x for x in again.splitlines() if x.startswith("VERDICT: ")] == verdict
    kids2 = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}'", max_results=1000)
    assert len(kids2) == len(kids) and {FIT_KEY_TAG in r.data.tags for r in kids2} == {True, False}


@pytest.mark.integration
@pytest.mark.parametrize(
    "extra, where",
    [(["--validate-top", "-1"], "--validate-top"), (["--validate-corpus", "/nonexistent/corpus"], "/nonexistent")],
)
def test_bad_validation_options_are_a_one_line_error_before_any_fit(home, capsys, extra, where):
    assert job("search_inr").main(["--smoke-test", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and where in err[0]


def _row(number: int, params: dict, objective: float, start: str | None = None, outcome: str = "finished") -> dict:
    """A search's trial row as tune.search.results makes them (the fields the held-out validation reads)."""
    return {"number": number, "params": params, "objective": objective, START_KEY: start, "outcome": outcome}


def test_every_start_point_and_the_top_k_are_refitted_once_each_at_the_validation_steps_and_length(speech_clips):
    """What validate_search refits: the start points (the paper's first, a --start-from point too), then the K best
    trials that are not start points by the objective (a trial stopped by ASHA is not one of them); a trial that
    is the paper's configuration under another name is refitted once; every refit runs the validation's steps on
    the validation's length, with the search's seed, on every held-out clip."""
    paper, mine = start_point("kan"), start_point("kan", {"grid_size": 16})
    other, third = start_point("kan", {"grid_size": 12}), start_point("kan", {"spline_order": 2})
    rows = [
        _row(0, mine, 1.80, "grid16"),
        _row(1, paper, 1.70, "paper"),
        _row(2, other, 2.10),
        _row(3, dict(paper), 2.05),  # TPE suggested the paper's configuration again
        _row(4, third, 2.00),
        _row(5, start_point("kan", {"grid_size": 20}), 2.50, outcome="stopped"),
    ]
    summary = SearchSummary(
        "e", "p", "http://127.0.0.1:1", "max", 6, 5, 1, 0, 0, 0, best=rows[2], starts=[rows[1], rows[0]],
        comparison_markdown="", seconds=0.0,
    )  # fmt: skip
    configs, winner = configurations(summary, rows, 2, ("kan",))
    assert [label for label, _ in configs] == ["paper config", "grid16", "best (trial 2)", "#2 (trial 3)"]
    assert winner == "best (trial 2)" and configs[2][1] == other
    assert configurations(summary, rows, 0, ("kan",))[0] == configs[:2]  # --validate-top 0: the start points

    clips = speech_clips[:3]
    tasks, same = validation_tasks(configs, clips, 32_768, 10_000, 7)
    assert same == {"#2 (trial 3)": "paper config"}
    assert [(t.label, t.clip_id) for t in tasks] == [(n, c.clip_id) for n, _ in configs[:3] for c in clips]
    assert {(t.cfg.steps, t.cfg.seed, t.length) for t in tasks} == {(10_000, 7, 32_768)}
    assert tasks[0].cfg.inr["grid_size"] != tasks[3].cfg.inr["grid_size"] == 16  # each label its own configuration
