"""Scale from zero on one machine: an emulated autoscaling cluster with node types mirroring cluster.yaml.

Ray's `fake_multinode` provider, started the way `ray.cluster_utils.AutoscalingCluster` starts it (a head with
`RAY_FAKE_CLUSTER=1` and `--autoscaling-config`; the pinned wheel lacks the example config that class reads, so
the config is written here) but on free ports with its own temp dir (that class runs `ray stop --force`, which
would stop every Ray on the machine). Node types as in cluster.yaml: a head with 0 CPUs, a 1-GPU type and a
4-GPU type carrying the custom resource gpu_multi, both from 0 nodes. The GPUs are logical (no CUDA device), so
fits and training run on the CPU, as they fall back to.

- A sweep of 20 fits (NeRF + SIREN on the built-in corpus), planned for the ceiling that FEWSOUND_MAX_GPUS/_CPUS
  state (nothing is up when it starts), makes the autoscaler start worker nodes and runs its trials there,
  each with 1/4 GPU.
- A training smoke run (jobs/train_fewsound.py --smoke-test) gets its workers on the 4-GPU type.
Drivers run as their own processes (tests/emulated_driver.py), as a job's driver does. The figures (nodes
started, fits per node, GPU fraction per trial) are printed for the record.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import socket
import subprocess
import sys

import pytest
from support import REPO, VENV_BIN, RayHead  # tests/support.py

from fewsound import tracking

pytestmark = pytest.mark.system

SPOT = {"CPU": 1, "GPU": 1}  # cluster.yaml's gpu_spot, smaller
MULTI = {"CPU": 2, "GPU": 4, "gpu_multi": 4}  # cluster.yaml's gpu_multi: 4 GPUs and the custom resource
STORE = {"object_store_memory": 200 << 20}  # each emulated node's object store (the default is 30% of the RAM)
MAX_SPOT, MAX_MULTI = 2, 1
CEILING = {
    "FEWSOUND_MAX_GPUS": str(MAX_SPOT * SPOT["GPU"] + MAX_MULTI * MULTI["GPU"]),
    "FEWSOUND_MAX_CPUS": str(MAX_SPOT * SPOT["CPU"] + MAX_MULTI * MULTI["CPU"]),
    "FEWSOUND_TRAIN_GPUS": str(MULTI["GPU"]),
    "FEWSOUND_TRAIN_CPUS": str(MULTI["CPU"]),
}


def fake_cluster_config(gcs_address: str) -> dict:
    """The autoscaling config of the emulated cluster (what cluster.yaml is to AWS)."""
    node = {"node_config": {}, "min_workers": 0}
    return {
        "cluster_name": "fewsound-emulated",
        "max_workers": MAX_SPOT + MAX_MULTI,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu_spot": {**node, "resources": {**SPOT, **STORE}, "max_workers": MAX_SPOT},
            "gpu_multi": {**node, "resources": {**MULTI, **STORE}, "max_workers": MAX_MULTI},
        },
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The emulated cluster (its head only, at first), token authentication on as in cluster.yaml, and an MLflow
    server. Yields the environment of a driver process (RAY_ADDRESS, the FEWSOUND_* ceiling settings as
    cluster.yaml sets them, MLFLOW_TRACKING_URI)."""

    root = tmp_path_factory.mktemp("autoscaling")
    home = root / "home"
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {
        **os.environ,
        **CEILING,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "FEWSOUND_HOME": str(home),
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        # on SIGTERM the head stops at once; by default it first drains for up to 30 s, and a head that ran these
        # jobs never finishes draining (it waited the whole 30 s)
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    config = root / "autoscaling.json"
    extra = [f"--autoscaling-config={config}", "--num-cpus=0", "--num-gpus=0",
             f"--object-store-memory={STORE['object_store_memory']}"]  # fmt: skip
    head = RayHead(root, env, extra=extra, dashboard=True, host=socket.gethostbyname(socket.gethostname()), cwd=REPO)
    config.write_text(json.dumps(fake_cluster_config(head.gcs)))
    uri = None
    try:
        head.start(attempts=1)  # the autoscaling config names its GCS port
        uri = tracking.start_local_server(home=home)
        yield {**env, "RAY_ADDRESS": head.gcs, "MLFLOW_TRACKING_URI": uri}
    finally:
        head.stop()  # the head, its autoscaler and the nodes it started
        if uri:
            tracking.stop_local_server(home)


def drive(env: dict, what: str) -> tuple[dict, str]:
    """Run tests/emulated_driver.py WHAT on the cluster: (its RESULT, its output)."""
    p = subprocess.run(
        [sys.executable, str(REPO / "tests" / "emulated_driver.py"), what],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-5000:]
    assert "RESULT " in p.stdout, out[-5000:]
    (line,) = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT ")), p.stdout


def test_a_sweep_scales_from_zero_and_runs_its_trials_with_gpu_fractions_on_the_new_nodes(cluster, capsys):
    from mlflow.tracking import MlflowClient

    from tune.spine import FIT_KEY_TAG

    r, out = drive(cluster, "sweep")
    assert r["nodes_before"] == {}, "the cluster starts with no worker node"
    # planned for the ceiling: 6 GPUs, 4 CPUs -> 4 slots of 1/4 GPU + 1 CPU (not 1 slot for the 0 CPUs up now),
    # more than one node holds: the autoscaler has to start several
    assert (
        "[autoscale] planning for 6 GPUs, 4 CPUs (cluster ceiling from FEWSOUND_MAX_GPUS/FEWSOUND_MAX_CPUS; "
        "up now: 0 GPUs, 0 CPUs): 4 trial slots of 1/4 GPU + 1 CPU" in out
    ), out[-3000:]
    assert (r["done"], r["failed"]) == (r["fits"], 0) and r["fits"] >= 20, out[-3000:]
    assert r["resources"] == {"cpu": 1, "gpu": 0.25}
    assert r["packs"] and all(p["assigned_GPU"] == 0.25 and p["assigned_CPU"] == 1.0 for p in r["packs"])

    nodes = r["nodes"]
    client = MlflowClient(tracking_uri=cluster["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("test-autoscale")
    kids = [k for k in client.search_runs([exp.experiment_id], max_results=1000) if FIT_KEY_TAG in k.data.tags]
    assert len(kids) == r["fits"] and all(k.info.status == "FINISHED" for k in kids)
    per_node = collections.Counter(k.data.tags["fewsound.node"] for k in kids)
    assert set(per_node) <= set(nodes), "every fit ran on a worker node the autoscaler started"
    assert len(per_node) >= 2, per_node
    figures = {
        "worker_nodes_started": dict(
            collections.Counter("gpu_multi" if n.get("gpu_multi") else "gpu_spot" for n in nodes.values())
        ),
        "fits_per_node": {f"{nid[-6:]} ({int(nodes[nid]['GPU'])} GPU)": n for nid, n in sorted(per_node.items())},
        "gpu_fraction_per_trial": sorted({p["assigned_GPU"] for p in r["packs"]}),
        "trials": r["trials"],
        "packs": len(r["packs"]),
        "fits": r["fits"],
        "sweep_seconds": round(r["seconds"], 1),
    }
    with capsys.disabled():
        print(f"\nemulated autoscaling sweep: {json.dumps(figures)}")


def test_training_smoke_run_gets_its_workers_on_the_4_gpu_node_type(cluster, capsys):
    r, out = drive(cluster, "train")
    assert r["rc"] == 0, out[-3000:]
    assert (
        "[train] asking for 2 GPU workers x (1 GPU + 0.5 CPU) on nodes with gpu_multi (--num-workers 2; pinned to it)"
        in out
    ), out[-3000:]
    assert "no CUDA device: training on their CPUs (gloo)" in out
    assert "3 epochs on 2 GPU worker(s)" in out
    nodes = r["nodes"]
    assert len(r["worker_nodes"]) >= 2
    assert all(nodes[n].get("gpu_multi") == MULTI["gpu_multi"] for n in r["worker_nodes"]), (r, nodes)
    with capsys.disabled():
        print(f"\nemulated training: {len(r['worker_nodes'])} Ray Train workers, all on gpu_multi nodes")
