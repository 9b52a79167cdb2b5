"""What jobs ask Ray for (tune.ray_env), decided from the cluster's capacity: its ceiling where the cluster states
one (FEWSOUND_MAX_GPUS/_CPUS, set by cluster.yaml), else what is up. No Ray cluster is started here."""

from __future__ import annotations

import pytest

from fewsound.errors import ConfigError
from tune.ray_env import TRAIN_RESOURCE, capacity, choose_scaling, fraction_text, trial_resources, trial_slots

CEILING_VARS = ("FEWSOUND_MAX_GPUS", "FEWSOUND_MAX_CPUS", "FEWSOUND_TRAIN_GPUS", "FEWSOUND_TRAIN_CPUS")


@pytest.fixture(autouse=True)
def no_settings(monkeypatch):
    for k in (*CEILING_VARS, "FEWSOUND_USE_GPU"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_trial_slots_follow_the_resources_up_now_without_a_ceiling():
    assert trial_slots(capacity({"CPU": 2.0}), {"cpu": 1}) == 2
    assert trial_slots(capacity({"CPU": 16.0, "GPU": 1.0}), {"cpu": 1, "gpu": 0.25}) == 4  # four quarters of a GPU
    assert trial_slots(capacity({"CPU": 2.0, "GPU": 1.0}), {"cpu": 1, "gpu": 0.125}) == 2  # CPUs bound it
    assert trial_slots(capacity({}), {"cpu": 1}) == 1


def test_a_cluster_at_zero_plans_for_its_ceiling_and_max_concurrent_caps_it(no_settings):
    """The head has 0 CPUs and the GPU nodes are at zero: without the ceiling a sweep would plan one slot."""
    up_now = {"CPU": 0.0}
    assert trial_resources(capacity(up_now)) == {"cpu": 1}  # nothing says GPUs may come
    no_settings.setenv("FEWSOUND_MAX_GPUS", "8")
    no_settings.setenv("FEWSOUND_MAX_CPUS", "64")
    cap = capacity(up_now)
    assert (cap.gpus, cap.cpus, cap.ceiling) == (8.0, 64.0, True)
    res = trial_resources(cap, 0.25)
    assert res == {"cpu": 1, "gpu": 0.25}  # auto: the cluster can grow GPUs, so trials ask for fractions
    assert trial_slots(cap, res) == 32
    assert trial_slots(cap, res, max_concurrent=10) == 10
    assert trial_slots(cap, trial_resources(cap, 0.125)) == 64  # 64 eighths, 64 CPUs
    assert "8 GPUs, 64 CPUs (cluster ceiling from FEWSOUND_MAX_GPUS/FEWSOUND_MAX_CPUS" in cap.describe()
    assert fraction_text(res) == "1/4 GPU + 1 CPU" and fraction_text({"cpu": 1}) == "1 CPU"
    # what is up counts when it is more than the stated ceiling
    assert capacity({"CPU": 100.0, "GPU": 16.0}).gpus == 16.0


def test_use_gpu_switch_and_bad_settings_are_config_errors(no_settings):
    no_settings.setenv("FEWSOUND_MAX_GPUS", "4")
    no_settings.setenv("FEWSOUND_USE_GPU", "0")
    assert trial_resources(capacity({"CPU": 8.0})) == {"cpu": 1}
    no_settings.setenv("FEWSOUND_USE_GPU", "maybe")
    with pytest.raises(ConfigError, match="FEWSOUND_USE_GPU"):
        trial_resources(capacity({}))
    no_settings.setenv("FEWSOUND_MAX_GPUS", "lots")
    with pytest.raises(ConfigError, match="FEWSOUND_MAX_GPUS: 'lots' is not a number"):
        capacity({})
    no_settings.delenv("FEWSOUND_MAX_GPUS")
    with pytest.raises(ConfigError, match="does not divide one GPU"):
        trial_resources(capacity({"CPU": 1.0}), 0.3)


def test_training_defaults_to_one_multi_gpu_node_and_is_pinned_there(no_settings):
    no_settings.setenv("FEWSOUND_MAX_GPUS", "16")
    no_settings.setenv("FEWSOUND_TRAIN_GPUS", "4")
    no_settings.setenv("FEWSOUND_TRAIN_CPUS", "48")
    scaling, cpu_each, why = choose_scaling({"CPU": 0.0})  # the GPU nodes are still at zero
    assert scaling.num_workers == 4 and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 4.0, "GPU": 1, TRAIN_RESOURCE: 1}
    assert "FEWSOUND_TRAIN_GPUS=4" in why and "pinned" in why
    scaling, _, why = choose_scaling({"CPU": 0.0}, num_workers=8)  # --num-workers overrides the count
    assert scaling.num_workers == 8 and scaling.resources_per_worker[TRAIN_RESOURCE] == 1
    assert "--num-workers 8" in why


def test_training_without_gpus_uses_cpu_workers_and_leaves_one_cpu_to_ray_data():
    scaling, cpu_each, why = choose_scaling({"CPU": 2.0})
    assert (scaling.num_workers, scaling.use_gpu, cpu_each) == (2, False, 0.5)
    assert "no GPUs" in why
    with pytest.raises(ConfigError, match="--num-workers"):
        choose_scaling({"CPU": 2.0}, num_workers=8)
    with pytest.raises(ConfigError, match="--num-workers: must be >= 1"):
        choose_scaling({"CPU": 2.0}, num_workers=0)
