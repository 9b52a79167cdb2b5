"""cluster.yaml is checked offline with Ray's own config preparation and schema validation (what `ray up` runs
before it touches a cloud)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_validation(config):
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}, "the head must not run trials"
    assert types["head"]["max_workers"] == 0
    for name in ("gpu_multi", "gpu_spot"):
        assert types[name]["min_workers"] == 0, f"{name} must scale from zero"
    assert types["gpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert prepared["docker"]["image"].startswith("rayproject/ray:")
    import ray

    assert f"ray:{ray.__version__}-py311-gpu" in prepared["docker"]["image"], "image must match the pinned Ray"


def test_head_runs_mlflow_server_and_ports_stay_private(config):
    start = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in start and "sqlite:///" in start and "--serve-artifacts" in start
    assert "--dashboard-host=127.0.0.1" in start
    # the embedded server's gunicorn settings, from the checkout as mounted on the head (file_mounts)
    conf = "/home/ray/fewsound/fewsound/mlflow_gunicorn.py"
    assert f'--gunicorn-opts "--config {conf}"' in start
    mount = config["file_mounts"]["/home/ray/fewsound"]
    assert (CLUSTER_YAML.parent / mount / conf.removeprefix("/home/ray/fewsound/")).is_file()
    assert "--num-cpus=0" in start
    workers = " ".join(config["worker_start_ray_commands"])
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in workers
    assert "FEWSOUND_STORAGE=" in workers and "FEWSOUND_STORAGE=" in start


def test_no_credentials_in_the_file():
    text = CLUSTER_YAML.read_text().lower()
    for word in ("aws_access_key", "aws_secret", "password", "token:"):
        assert word not in text


@pytest.mark.parametrize(
    "typo",
    [
        ("top", "setup_comands", []),
        ("node", "max_worker", 3),
        ("docker", "imag", "rayproject/ray:2.60.0-py311-gpu"),
    ],
)
def test_a_typo_in_a_key_fails_validation(config, typo):
    import jsonschema

    where, key, value = typo
    bad = copy.deepcopy(config)
    if where == "top":
        bad[key] = value
    elif where == "node":
        bad["available_node_types"]["gpu_spot"][key] = value
    else:
        bad["docker"][key] = value
    with pytest.raises((jsonschema.ValidationError, ValueError)) as e:
        validate_config(prepare_config(bad))
    assert key in str(e.value)
