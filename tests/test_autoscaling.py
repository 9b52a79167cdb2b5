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
The figures (nodes started, trials per node, GPU fraction per trial) are printed for the record.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fewsound import tracking
from fewsound.fit import FitConfig
from fewsound.plan import FitTask

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """The emulated cluster (head only at first) joined by this process; FEWSOUND_* ceiling settings as
    cluster.yaml sets them. Yields (dashboard address, MLflow URI)."""
    import psutil
    import ray

    from tune.ray_env import init_ray

    ray.shutdown()  # an earlier test module's Ray in this process must not stand in for the cluster
    root = tmp_path_factory.mktemp("autoscaling")
    home = root / "home"
    ip = ray.util.get_node_ip_address()
    gcs = f"{ip}:{_free_port()}"
    config = root / "autoscaling.json"
    config.write_text(json.dumps(fake_cluster_config(gcs)))
    dash = _free_port()
    temp_dir = Path(f"/tmp/fsas_{secrets.token_hex(3)}")  # short: Ray's unix socket paths have a length limit
    env = {
        **os.environ,
        **CEILING,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FEWSOUND_HOME": str(home),
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--autoscaling-config={config}",
        "--num-cpus=0",
        "--num-gpus=0",
        f"--object-store-memory={STORE['object_store_memory']}",
        f"--port={gcs.rsplit(':', 1)[1]}",
        f"--temp-dir={temp_dir}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        "--disable-usage-stats",
    ]
    log = open(root / "ray_head.log", "wb")
    head = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in CEILING.items():
            mp.setenv(k, v)
        mp.setenv("FEWSOUND_HOME", str(home))
        uri = tracking.start_local_server(home=home)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("RAY_ADDRESS", gcs)
        try:
            deadline = time.monotonic() + 120
            while not ray.is_initialized():
                assert head.poll() is None, (root / "ray_head.log").read_text()[-3000:]
                try:
                    init_ray(gcs)  # as the jobs join a cluster
                except ConnectionError:
                    assert time.monotonic() < deadline, "the head did not start"
                    time.sleep(2)
            yield f"http://127.0.0.1:{dash}", uri
        finally:
            ray.shutdown()
            ours = psutil.Process(head.pid).children(recursive=True)  # head, autoscaler and the nodes it started
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
            for proc in ours:  # worker nodes are started by the autoscaler, outside the head's process group
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            log.close()
            tracking.stop_local_server(home)


def worker_nodes() -> dict[str, dict]:
    """Node id -> resources of every worker node that has been up (alive or not), from ray.nodes()."""
    import ray

    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Resources"].get("GPU", 0) > 0}


def test_a_sweep_scales_from_zero_and_runs_its_trials_with_gpu_fractions_on_the_new_nodes(cluster, capsys):
    from mlflow.tracking import MlflowClient

    from tune.jobs import corpus_clips, resolve_corpus
    from tune.sweep import run_sweep
    from tune.trial import KEY_TAG

    _, uri = cluster
    assert worker_nodes() == {}, "the cluster starts with no worker node"
    corpus = resolve_corpus(None, 4096)
    clips = corpus_clips(corpus, "10", "all")
    families = ("nerf", "siren")
    tasks = [FitTask(FitConfig(family=f, steps=3), c.clip_id, c.kind, 4096, f) for f in families for c in clips]
    assert len(tasks) >= 20
    t0 = time.perf_counter()
    s = run_sweep(
        "autoscale",
        tasks,
        corpus=corpus,
        experiment="test-autoscale",
        pack_size=2,
        trials_per_slot=1,
        metrics=("mse",),
        log_artifacts=False,
    )
    seconds = time.perf_counter() - t0
    out = capsys.readouterr().out
    # planned for the ceiling: 6 GPUs, 4 CPUs -> 4 slots of 1/4 GPU + 1 CPU (not 1 slot for the 0 CPUs up now),
    # more than one node holds: the autoscaler has to start several
    assert (
        "[autoscale] planning for 6 GPUs, 4 CPUs (cluster ceiling from FEWSOUND_MAX_GPUS/FEWSOUND_MAX_CPUS; "
        "up now: 0 GPUs, 0 CPUs): 4 trial slots of 1/4 GPU + 1 CPU" in out
    ), out
    assert (s.done, s.failed) == (len(tasks), 0)
    assert s.resources == {"cpu": 1, "gpu": 0.25}
    assert all(p["assigned_GPU"] == 0.25 and p["assigned_CPU"] == 1.0 for p in s.packs)

    nodes = worker_nodes()
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("test-autoscale")
    kids = [r for r in client.search_runs([exp.experiment_id], max_results=1000) if KEY_TAG in r.data.tags]
    per_node = collections.Counter(r.data.tags["fewsound.node"] for r in kids)
    assert len(kids) == len(tasks) and all(r.info.status == "FINISHED" for r in kids)
    assert set(per_node) <= set(nodes), "every fit ran on a worker node the autoscaler started"
    assert len(per_node) >= 2, per_node
    figures = {
        "worker_nodes_started": dict(
            collections.Counter("gpu_multi" if r.get("gpu_multi") else "gpu_spot" for r in nodes.values())
        ),
        "fits_per_node": {f"{nid[:8]} ({int(nodes[nid]['GPU'])} GPU)": n for nid, n in per_node.items()},
        "gpu_fraction_per_trial": sorted({p["assigned_GPU"] for p in s.packs}),
        "trials": s.n_trials,
        "fits": len(tasks),
        "sweep_seconds": round(seconds, 1),
    }
    with capsys.disabled():
        print(f"\nemulated autoscaling sweep: {json.dumps(figures)}")


def test_training_smoke_run_gets_its_workers_on_the_4_gpu_node_type(cluster, capsys):
    from ray.util.state import list_actors

    dashboard, _ = cluster
    sys.path.insert(0, str(REPO / "jobs"))
    import train_fewsound

    assert train_fewsound.main(["--smoke-test", "--experiment", "test-autoscale-train"]) == 0
    out = capsys.readouterr().out
    assert (
        "[train] asking for 2 GPU workers x (1 GPU + 0.5 CPU) on nodes with gpu_multi (--num-workers 2; pinned to it)"
        in out
    ), out
    assert "no CUDA device: training on their CPUs (gloo)" in out
    assert "3 epochs on 2 GPU worker(s)" in out
    nodes = worker_nodes()
    workers = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], limit=100)
    assert len(workers) >= 2
    on = collections.Counter(nodes[w.node_id].get("gpu_multi", 0) for w in workers)
    assert on == {MULTI["gpu_multi"]: len(workers)}, "every training worker ran on a 4-GPU (gpu_multi) node"
    with capsys.disabled():
        print(f"\nemulated training: {len(workers)} workers, all on gpu_multi nodes")
