"""cluster.yaml is checked offline with Ray's own config preparation and schema validation (what `ray up` runs
before it touches a cloud), and for what jobs rely on: the ceiling settings agree with the node types, training's
node type carries its custom resource, Ray starts from the checkout with token auth, workers reach the bucket."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler.sdk import fillout_defaults

from tune.ray_env import TRAIN_RESOURCE

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
CHECKOUT = "/home/ray/fewsound"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def container_env(config: dict) -> dict[str, str]:
    """The settings every node sees: `--env K=V` items of docker.run_options."""
    env = {}
    for item in config["docker"]["run_options"]:
        words = shlex.split(item)
        if words[0] == "--env":
            k, v = words[1].split("=", 1)
            env[k] = v
    return env


def validated(config: dict) -> dict:
    """`ray up`'s checks through Ray's public API: the provider's defaults filled in (ray.autoscaler.sdk), then the
    cluster-config JSON schema that Ray ships (ray/autoscaler/ray-schema.json), which refuses unknown keys."""
    import importlib.resources
    import json

    import jsonschema

    prepared = fillout_defaults(copy.deepcopy(config))
    schema = json.loads(importlib.resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text())
    jsonschema.validate(prepared, schema)
    return prepared


def test_cluster_yaml_passes_rays_validation(config):
    prepared = validated(config)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}, "the head must not run trials"
    assert types["head"].get("max_workers", 0) == 0, "the head type starts no workers of its own"
    for name in ("gpu_multi", "gpu_spot"):
        assert types[name]["min_workers"] == 0, f"{name} must scale from zero"
    assert types["gpu_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert prepared["docker"]["image"].startswith("rayproject/ray:")
    import ray

    assert f"ray:{ray.__version__}-py311-gpu" in prepared["docker"]["image"], "image must match the pinned Ray"


def test_the_ceiling_settings_agree_with_the_node_types(config):
    """Jobs plan for FEWSOUND_MAX_GPUS/_CPUS: they must be what the autoscaler may start, no more, no less."""
    env = container_env(config)
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert float(env["FEWSOUND_MAX_GPUS"]) == sum(t["max_workers"] * t["resources"]["GPU"] for t in workers.values())
    assert float(env["FEWSOUND_MAX_CPUS"]) == sum(t["max_workers"] * t["resources"]["CPU"] for t in workers.values())
    assert config["max_workers"] == sum(t["max_workers"] for t in workers.values())
    # training: one node of the type that carries the custom resource, one worker per GPU
    multi = workers[TRAIN_RESOURCE]["resources"]
    assert multi[TRAIN_RESOURCE] == multi["GPU"] == float(env["FEWSOUND_TRAIN_GPUS"]) > 1
    assert float(env["FEWSOUND_TRAIN_CPUS"]) == multi["CPU"]
    assert TRAIN_RESOURCE not in workers["gpu_spot"]["resources"], "sweep nodes must not take training workers"
    assert env["FEWSOUND_STORAGE"].startswith("s3://") and env["RAY_AUTH_MODE"] == "token"


def test_workers_reach_the_bucket_and_check_their_gpu_driver(config):
    for name in ("gpu_multi", "gpu_spot"):
        t = config["available_node_types"][name]
        arn = t["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), arn
        check = " ".join(t["initialization_commands"])
        assert "nvidia-smi --query-gpu=driver_version" in check and "580" in check and "exit 1" in check


def test_ray_starts_from_the_checkout_with_token_auth_and_the_mlflow_server_on_the_head(config):
    mount = config["file_mounts"][CHECKOUT]
    assert (CLUSTER_YAML.parent / mount / "jobs" / "train_fewsound.py").is_file()
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for key, start in (("head_start_ray_commands", "ray start --head"), ("worker_start_ray_commands", "ray start")):
        (cmd,) = [c for c in config[key] if "ray start" in c]
        # jobs submitted without --working-dir run in the folder Ray was started from
        assert cmd.index(f"cd {CHECKOUT} &&") < cmd.index(start), cmd
    head = config["head_start_ray_commands"]
    (server,) = [c for c in head if "fewsound mlflow serve" in c]
    assert "ray start" not in server, "the MLflow server line is its own list item"
    # the SQLite store on the head, backed up to (and restored from) the bucket; artifacts in the bucket
    assert "--store /home/ray/mlflow/mlflow.db" in server and "--backup s3://" in server
    assert "--artifacts s3://" in server and "--host 0.0.0.0 --port 5000" in server
    start = " ".join(head)
    assert "--dashboard-host=127.0.0.1" in start and "--num-cpus=0" in start
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in " ".join(config["worker_start_ray_commands"])


def test_the_mlflow_server_wants_logins_from_copied_files_and_answers_only_the_cluster(config):
    """basic-auth by default; its admin login and Flask key are files `ray up` copies from the laptop (where
    `python -m fewsound mlflow secrets` makes them), on every node, where MLflow's clients read the login; the
    allowed hosts are the head's own address (as every node's MLFLOW_TRACKING_URI names it) and localhost."""
    from fewsound.mlflow_server import CREDENTIALS_FILE, FLASK_SECRET_FILE, SECRETS_DIR

    mounts = config["file_mounts"]
    assert mounts["/home/ray/.mlflow/credentials"] == f"{SECRETS_DIR}/{CREDENTIALS_FILE}"  # MLflow's clients
    (key_path,) = [k for k, v in mounts.items() if v == f"{SECRETS_DIR}/{FLASK_SECRET_FILE}"]
    (server,) = [c for c in config["head_start_ray_commands"] if "fewsound mlflow serve" in c]
    words = shlex.split(server.replace("$(hostname -I | awk '{print $1}')", "HEAD"))
    opt = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
    assert opt["--app-name"] == "basic-auth"
    assert opt["--credentials"] == "/home/ray/.mlflow/credentials" and opt["--flask-secret"] == key_path
    assert opt["--allowed-hosts"].split(",") == ["HEAD:5000", "localhost:*", "127.0.0.1:*"]
    head_uri = [c for c in config["head_start_ray_commands"] if "ray start" in c][0]
    assert "MLFLOW_TRACKING_URI=http://$(hostname -I | awk '{print $1}'):5000" in head_uri  # the same address
    # the login never travels in the environment or on a command line, only in the copied files
    env = " ".join(config["docker"]["run_options"]) + " ".join(config["head_start_ray_commands"])
    assert "MLFLOW_TRACKING_USERNAME" not in env and "MLFLOW_FLASK_SERVER_SECRET_KEY" not in env
    for local in mounts.values():
        assert local == "." or local.startswith("~/"), "file_mounts copy files from the laptop, never values"


def test_no_credentials_in_the_file():
    text = CLUSTER_YAML.read_text().lower()
    for word in ("aws_access_key", "aws_secret", "password", "secret_access"):
        assert word not in text
    assert not re.search(r"^\s*(token|key|secret)\s*:", text, flags=re.M)


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
    with pytest.raises(jsonschema.ValidationError) as e:
        validated(bad)
    assert key in str(e.value)
