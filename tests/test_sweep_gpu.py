"""GPU fractions without a GPU: a local Ray started with num_gpus=1 declares one logical GPU, so trials asking for
1/4 GPU run four at a time (torch still runs on the CPU: nothing here needs CUDA); a Ray without GPUs gets the
same sweep asking for CPUs only. Concurrency is read from the time spans the trials themselves record."""

from __future__ import annotations

import pytest

from fewsound.fit import FitConfig
from fewsound.plan import FitTask


@pytest.fixture(scope="module")
def corpus(env):
    from tune.jobs import resolve_corpus

    return resolve_corpus(None, 4096)


def max_overlap(trials: list[dict]) -> int:
    """Most trials running at one instant, from their [start, end] spans."""
    events = sorted([(t["start"], 1) for t in trials] + [(t["end"], -1) for t in trials], key=lambda e: (e[0], e[1]))
    best = running = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


def sweep(corpus: str, seed: int, experiment: str, **ray_kw):
    import ray

    from tune.jobs import corpus_clips
    from tune.ray_env import init_ray, quiet_defaults
    from tune.sweep import run_sweep

    quiet_defaults()
    clips = corpus_clips(corpus, "8", "all")  # the INR protocol keeps one speech clip per voice (5)
    tasks = [FitTask(FitConfig(family="nerf", steps=40, seed=seed), c.clip_id, c.kind, 4096, "nerf") for c in clips]
    ray.shutdown()  # a Ray left running by an earlier test module would keep its own resources
    init_ray(**ray_kw)
    try:
        return run_sweep(
            "gpu",
            tasks,
            corpus=corpus,
            experiment=experiment,
            pack_size=1,
            gpu_fraction=0.25,
            progress=False,
            metrics=("mse",),
            log_artifacts=False,
        )
    finally:
        ray.shutdown()


def test_quarter_gpu_trials_run_four_at_a_time_on_one_logical_gpu(corpus):
    s = sweep(corpus, seed=1, experiment="test-gpu", num_cpus=4, num_gpus=1)
    assert s.resources == {"cpu": 1, "gpu": 0.25}
    assert (s.done, s.failed, len(s.packs), s.n_trials) == (8, 0, 8, 8)
    for t in s.packs:  # what the scheduler granted each trial, as the trial saw it
        assert (t["assigned_GPU"], t["assigned_CPU"], t["torch_threads"]) == (0.25, 1.0, 1)
        assert t["gpu_share"] == 1.0  # a logical GPU without CUDA: no memory cap (tests/test_gpu.py: 0.25 on CUDA)
    assert max_overlap(s.packs) == 4  # 4 CPUs and 4 quarters of the GPU: never more, and it got there
    assert len({t["pid"] for t in s.packs}) == 4  # four reused actors


def test_without_gpus_the_same_sweep_asks_for_cpus_only_and_its_trials_hide_the_nodes_gpus(corpus, monkeypatch):
    """On a Ray without GPUs the same sweep asks for CPUs only. Ray leaves CUDA_VISIBLE_DEVICES alone in a 0-GPU
    worker: a Ray started where it lists two devices would let every CPU trial see them (and put its fits on
    cuda:0). The trial hides them (tune.ray_env.cpu_means_cpu). One sweep shows both."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the environment the local Ray and its workers start in
    s = sweep(corpus, seed=2, experiment="test-gpu", num_cpus=2)
    assert s.resources == {"cpu": 1}
    assert (s.done, s.failed) == (8, 0)
    assert all("assigned_GPU" not in t and t["assigned_CPU"] == 1.0 and t["torch_threads"] == 1 for t in s.packs)
    assert max_overlap(s.packs) <= 2
    assert {(t["device"], t["cuda_visible_devices"]) for t in s.packs} == {("cpu", "")}
