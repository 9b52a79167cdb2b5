"""More than 1,000 fits through the real sweep path (run_sweep on a real local Ray and a real MLflow server over
HTTP), short enough for CI: NERF, one step, 4,096-sample crops of the built-in corpus's clips (each clip reused by
many configs that differ by seed), MSE and PSNR only, no per-fit audio or spectrogram. Every fit ends with exactly
one FINISHED child run, a re-run of the same sweep skips all of them, and the parent run's tables list them all.
benchmarks/sweep_scale.py measures the same path at larger N."""

from __future__ import annotations

import collections
import csv
import io
import time
from pathlib import Path

import pytest

N_CONFIGS, PER_CONFIG = 63, 16  # 1,008 fits: 63 full packs


@pytest.fixture(scope="module")
def ray_local(env):
    import ray

    from tune.ray_env import init_ray, quiet_defaults

    quiet_defaults()
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_a_sweep_of_over_a_thousand_fits_finishes_each_once_and_a_rerun_skips_them_all(ray_local, env, tmp_path):
    from mlflow.tracking import MlflowClient

    from fewsound.data.corpus import open_corpus
    from fewsound.fit import FitConfig
    from fewsound.plan import FitTask
    from tune.jobs import resolve_corpus
    from tune.spine import FIT_KEY_TAG, search_runs
    from tune.sweep import run_sweep

    corpus = resolve_corpus(None, 4096)
    clips = list(open_corpus(corpus).clips())
    tasks = [
        FitTask(FitConfig(family="nerf", steps=1, seed=s), c.clip_id, c.kind, 4096, "NERF")
        for s in range(N_CONFIGS)
        for c in [clips[(s * PER_CONFIG + j) % len(clips)] for j in range(PER_CONFIG)]
    ]
    assert len({t.key for t in tasks}) == len(tasks) > 1000

    def sweep():
        t = time.perf_counter()
        s = run_sweep(
            "scale",
            tasks,
            corpus=corpus,
            experiment="test-scale",
            metrics=("mse", "psnr"),
            log_artifacts=False,
            listen_clips=0,
            progress=False,
            table={"title": "scale", "label_order": ["NERF"]},
        )
        return s, time.perf_counter() - t

    s, first = sweep()
    assert (s.done, s.failed, s.skipped) == (len(tasks), 0, 0)
    assert sum(p["fits_done"] for p in s.packs) == len(tasks)

    client = MlflowClient(tracking_uri=env[1])
    runs = search_runs(client, s.experiment_id, f"tags.`mlflow.parentRunId` = '{s.parent_run_id}'")
    per_key = collections.Counter(r.data.tags[FIT_KEY_TAG] for r in runs)
    assert set(per_key) == {t.key for t in tasks}
    assert set(per_key.values()) == {1}, "every fit has exactly one child run"
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.data.metrics.get("eval/mse") is not None for r in runs)

    again, rerun = sweep()
    assert (again.skipped, again.done, again.failed, again.n_trials) == (len(tasks), 0, 0, 0)
    assert len(search_runs(client, s.experiment_id, f"tags.`mlflow.parentRunId` = '{s.parent_run_id}'")) == len(runs)

    # the parent run's tables: one row per fit in results.csv, and the table's row over every clip of the sweep
    d = Path(client.download_artifacts(again.parent_run_id, "tables", str(tmp_path)))
    per_fit = list(csv.DictReader(io.StringIO((d / "results.csv").read_text())))
    assert sorted(r["key"] for r in per_fit) == sorted(t.key for t in tasks)
    assert "| NERF" in (d / "table.md").read_text()
    print(f"\n{len(tasks)} fits: first run {first:.1f} s, re-run {rerun:.1f} s")
