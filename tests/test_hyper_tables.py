"""jobs/hyper_tables.py and what it stands on: the grid has every row of the paper's Tables 2-6, shared rows are
one training, Table 6's paper numbers follow the dataset, Whisper rows are told apart; and (e2e) a real grid on
the built-in corpus: trainings as child runs of one parent, evaluated, tabled, and skipped on a re-run."""

from __future__ import annotations

import json
import os

import pytest
from support import REPO  # tests/support.py

from fewsound.hyper import HyperConfig
from fewsound.hyper.catalogue import PAPER_DATASETS, paper_cells
from fewsound.tables import build_table, hyper_label, paper_tables, paper_values, to_markdown, whisper_label
from tune.hyper.grid import max_parallel
from tune.hyper.grid_plan import Settings, plan


def test_grid_has_every_row_of_tables_2_to_6():
    cells = paper_cells([2, 3, 4, 5, 6], list(PAPER_DATASETS))
    for t in (2, 3, 4, 5):
        paper = [r["label"] for g in paper_tables()[t]["groups"] for r in g["rows"]]
        assert sorted(c.label for c in cells if c.table == t) == sorted(paper), t
    six = {(c.group, c.label) for c in cells if c.table == 6}
    assert six == {(g["name"], r["label"]) for g in paper_tables()[6]["groups"] for r in g["rows"]}
    assert {c.whisper for c in cells if c.encoder == "whisper"} == {"large-v2", "tiny.en"}
    with pytest.raises(Exception, match="--tables"):
        paper_cells([1, 2], ["VCTK"])


def test_shared_rows_are_one_training_and_whisper_rows_without_checkpoint_are_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSOUND_HOME", str(tmp_path))
    cells = paper_cells([2, 3, 5], ["builtin"])
    trainings = plan(cells, {"builtin": None}, Settings(train={}, overrides={}, whisper={}, smoke=True))
    todo = [t for t in trainings if t.skip is None]
    # T2: HyperSound, FewSound 17.5M, 41.2M; T3 adds KAN, SIREN; T5 adds Spectral, SNAC (SoundStream = T2's 17.5M)
    assert len(todo) == 7 and len({t.key for t in todo}) == 7
    shared = next(t for t in todo if any(c.label == "FewSound 17.5M" for c in t.cells))
    assert sorted((c.table, c.label) for c in shared.cells) == [(2, "FewSound 17.5M"), (3, "NERF"), (5, "SoundStream")]
    skipped = [t for t in trainings if t.skip]
    assert sorted(t.cells[0].label for t in skipped) == ["Whisper L", "Whisper T"]
    assert all("--whisper" in t.skip for t in skipped)


def test_parallel_trainings_fit_the_cluster():
    from tune.ray_env import choose_scaling

    laptop = {"CPU": 2.0}
    assert max_parallel(laptop, choose_scaling(laptop, None)[0]) == 1
    gpus = {"CPU": 33.0, "GPU": 4.0}
    assert max_parallel(gpus, choose_scaling(gpus, 1)[0]) == 4
    assert max_parallel(gpus, choose_scaling(gpus, None)[0]) == 1  # each training takes every GPU


def test_table_6_paper_numbers_follow_the_dataset():
    """The bug: Table 6's groups have no clip length, so the first group (VCTK) matched every dataset."""
    groups = {g["name"]: {r["label"]: r for r in g["rows"]} for g in paper_tables()[6]["groups"]}
    libri = paper_values(6, "NERF", 1.5, "LibriSpeech")
    assert libri["MSE"][0] == groups["LibriSpeech"]["NERF"]["values"]["MSE"]["mean"]
    assert libri != paper_values(6, "NERF", 1.5, "VCTK")
    assert paper_values(6, "NERF", 1.5) == {}  # no dataset: no guess
    assert paper_values(3, "KAN", 1.5)  # tables without dataset groups still match
    rows = [
        {"label": "KAN", "group": ds, "length": 32_768, "eval/mse": 0.01, "clip_id": f"c{i}"}
        for i, ds in enumerate(("GTZAN", "LJ Speech"))
    ]
    table = build_table(rows, title="t", paper_table=6)
    by_group = {g.name: g.rows[0].paper for g in table.groups}
    assert by_group["GTZAN, 1.5 s audio"]["MSE"][0] == groups["GTZAN"]["KAN"]["values"]["MSE"]["mean"]
    assert by_group["LJ Speech, 1.5 s audio"]["MSE"][0] == groups["LJ Speech"]["KAN"]["values"]["MSE"]["mean"]
    assert "PESQ" not in by_group["GTZAN, 1.5 s audio"]  # the paper prints '-' there


def test_whisper_rows_are_told_apart(tmp_path):
    """The bug: every Whisper model was labelled "Whisper L"."""
    for name, d_model in (("tiny", 384), ("big", 1280)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"d_model": d_model}))
    labels = [
        hyper_label(HyperConfig(encoder="whisper", whisper_checkpoint=str(tmp_path / n), preset="tiny"), 5)
        for n in ("tiny", "big")
    ]
    assert labels == ["Whisper T", "Whisper L"]
    assert whisper_label("/models/whisper-tiny.en") == "Whisper T"
    assert whisper_label("/models/whisper-large-v2") == "Whisper L"
    assert whisper_label("/models/whisper-medium") == "Whisper (whisper-medium)"
    assert hyper_label(HyperConfig(preset="tiny"), 5) == "SoundStream"


def test_missing_rows_keep_the_table_shape():
    rows = [{"label": "NERF", "length": 32_768, "eval/mse": 0.006, "clip_id": "a"}]
    md = to_markdown(build_table(rows, title="t", paper_table=3, label_order=["NERF", "KAN", "SIREN"], keep_empty=True))
    assert "| KAN | - | 0 | - (" in md and "| SIREN | - | 0 |" in md  # no result, the paper's number beside


@pytest.mark.integration
def test_grid_on_the_builtin_corpus_logs_one_parent_and_skips_on_rerun(env, tmp_path, monkeypatch, capsys):
    """Table 6 on two "datasets" that are both the built-in corpus: one training per target (the corpus is the
    same), four rows in two groups, every training a child of one parent with its evaluation; a re-run trains and
    evaluates nothing and reopens the same parent. Logged to the test session's MLflow server (conftest's `env`:
    started once for the sweep modules), trained under a home of its own."""
    import importlib.util

    import ray
    from mlflow.tracking import MlflowClient

    from tune.spine import EVAL_KEY_TAG as EVAL_TAG

    ray.shutdown()  # a Ray left by an earlier module has other servers in its workers' environment
    monkeypatch.setenv("FEWSOUND_HOME", str(tmp_path))
    uri = env[1]
    assert os.environ["MLFLOW_TRACKING_URI"] == uri
    spec = importlib.util.spec_from_file_location("hyper_tables", REPO / "jobs" / "hyper_tables.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = ["--tables", "6", "--datasets", "A=builtin,B=builtin", "--smoke-test", "--parallel", "1"]
    try:
        assert job.main(argv) == 0
        first = capsys.readouterr().out
        assert job.main(argv) == 0
        second = capsys.readouterr().out
        _check_grid_runs(MlflowClient(uri), first, second, EVAL_TAG)
    finally:
        ray.shutdown()


def _check_grid_runs(client, first: str, second: str, eval_tag: str) -> None:
    assert "**A, 4096 samples**" in first and "**B, 4096 samples**" in first, first
    assert first.count("| NERF | ") == 2 and first.count("| KAN | ") == 2, first
    assert "Long audio" in first and "T6 KAN (A), windowed" in first
    assert "2 trainings: 2 trained, 2 evaluated, 0 found finished" in first, first
    assert "2 trainings: 0 trained, 0 evaluated, 2 found finished" in second, second
    parent = first.split("parent run ")[1].split()[0]
    assert parent == second.split("parent run ")[1].split()[0]
    exp = client.get_experiment_by_name("hyper_tables-smoke")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 2
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags[eval_tag].startswith("eval-")
        assert {"evaluation/mse", "evaluation_long/mse", "val/loss", "train/loss"} <= set(c.data.metrics)
        assert len(client.get_metric_history(c.info.run_id, "train/loss")) == 2  # one point per epoch
    files = {a.path for a in client.list_artifacts(parent, "tables")}
    assert {"tables/table_6", "tables/long_audio", "tables/plots", "tables/tables.md"} <= files, files
    plots = {a.path for a in client.list_artifacts(parent, "tables/plots")}
    assert plots == {"tables/plots/table_6_A.png", "tables/plots/table_6_B.png"}
    assert client.get_run(parent).info.status == "FINISHED"


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hyper_tables", REPO / "jobs" / "hyper_tables.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    for argv, needle in (
        (["--tables", "1,2"], "--tables"),
        (["--tables", "two"], "--tables"),
        (["--datasets", "VCTK"], "--datasets"),
        (["--whisper", "small=/models/w"], "--whisper"),
        (["--set", "nonsense"], "--set"),
    ):
        assert job.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err
