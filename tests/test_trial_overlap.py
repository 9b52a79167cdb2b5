"""A trial evaluates pack k while it fits pack k + 1 (tune.sweep.trial.run_packs with overlap on, the default on a GPU):
the timestamps of pack k's evaluation overlap pack k + 1's fit; with overlap off (the CPU's default), each pack is
evaluated and recorded before the next one fits, and only its logging runs while the next one fits. Real fits of
built-in speech clips, real metrics (PESQ, STOI), real records and a real MLflow server (the session's)."""

from __future__ import annotations

import pytest

from fewsound import records

CORPUS = "builtin:inr-1.5s"


def _packs(per_pack: int) -> list[dict]:
    """The built-in corpus's speech clips (PESQ and STOI apply), `per_pack` a pack."""
    from fewsound.data.corpus import open_corpus
    from fewsound.fit import FitConfig
    from fewsound.plan import FitTask, pack_to_config

    speech = [i for i in open_corpus(CORPUS).infos() if i.kind == "speech"]
    cfg = FitConfig(family="nerf", steps=30, log_every=10)
    tasks = [FitTask(cfg, i.clip_id, i.kind, 16_384, "NERF") for i in speech]
    chunks = [tasks[k : k + per_pack] for k in range(0, len(tasks), per_pack)]
    return [dict(pack_to_config(chunk), index=k) for k, chunk in enumerate(chunks)]


def _run(env, overlap: bool, tmp_path) -> tuple[list[dict], list[str], str, str]:
    from mlflow.tracking import MlflowClient

    from fewsound.tracking import get_or_create_experiment
    from tune.sweep.context import TrialContext
    from tune.sweep.trial import run_packs

    uri = env[1]
    client = MlflowClient(tracking_uri=uri)
    exp = get_or_create_experiment(client, "t-overlap")
    parent = client.create_run(exp, run_name=f"overlap-{overlap}").info.run_id
    sweep = f"sw-overlap-{overlap}"
    root = str(tmp_path / "records")
    ctx = TrialContext(
        corpus=CORPUS,
        experiment="t-overlap",
        parent_run_id=parent,
        sweep=sweep,
        tracking_uri=uri,
        experiment_id=exp,
        metrics=("mse", "pesq", "stoi"),
        records=root,
        overlap_evaluation=overlap,
    )
    reported: list[dict] = []
    errors = run_packs(_packs(2), ctx, reported.append)
    return reported, errors, root, sweep


@pytest.mark.parametrize("overlap", [True, False])
def test_a_packs_evaluation_overlaps_the_next_packs_fit(env, tmp_path, overlap):
    reported, errors, root, sweep = _run(env, overlap, tmp_path)
    assert errors == []
    assert len(reported) >= 3 and [r["pack"] for r in reported] == list(range(len(reported)))  # in order
    assert all(r["fits_done"] >= 1 and r["fits_failed"] == r["fits_kept"] == 0 for r in reported), reported
    logged = records.scan(root, sweep)
    assert len(logged) == sum(r["fits_done"] for r in reported) and all(logged.values()), logged
    for k in range(len(reported) - 1):
        done, nxt = reported[k], reported[k + 1]
        assert done["fit_end"] <= done["eval_start"] <= done["eval_end"] <= done["end"]
        if overlap:
            # pack k + 1 started fitting before pack k's evaluation ended, and k's evaluation started before that
            # fit ended: the two ran at the same time
            assert nxt["fit_start"] < done["eval_end"] and done["eval_start"] < nxt["fit_end"], (done, nxt)
        else:
            # pack k evaluated and recorded before pack k + 1 started fitting; its logging (several round trips to
            # the server, begun after the records were written) was still going on when that fit started
            assert done["eval_end"] <= nxt["fit_start"] < done["end"], (done, nxt)
            assert done["eval_end"] <= done["log_start"] < nxt["fit_end"], (done, nxt)
