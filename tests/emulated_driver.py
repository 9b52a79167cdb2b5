"""A driver on the emulated autoscaling cluster of test_autoscaling.py, run as its own process as a job's driver
is (Ray reads its authentication settings when it is imported). `sweep` or `train`; prints `RESULT <json>`."""

from __future__ import annotations

import json
import sys

import ray
from support import REPO  # tests/support.py


def gpu_nodes() -> dict[str, dict]:
    """Node id -> resources of every worker node (the GPU types) that has been up."""
    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Resources"].get("GPU", 0) > 0}


def sweep() -> dict:
    """20 fits (NeRF + SIREN x 10 clips of the built-in corpus, tiny crops, 3 steps), one per pack."""
    from fewsound.fit import FitConfig
    from fewsound.plan import FitTask
    from tune.jobs import corpus_clips, resolve_corpus
    from tune.ray_env import init_ray
    from tune.sweep import run_sweep

    init_ray()  # joins $RAY_ADDRESS
    before = gpu_nodes()
    corpus = resolve_corpus(None, 4096)
    clips = corpus_clips(corpus, "10", "all")
    tasks = [
        FitTask(FitConfig(family=f, steps=3), c.clip_id, c.kind, 4096, f) for f in ("nerf", "siren") for c in clips
    ]
    s = run_sweep(
        "autoscale",
        tasks,
        corpus=corpus,
        experiment="test-autoscale",
        pack_size=1,
        trials_per_slot=1,
        metrics=("mse",),
        log_artifacts=False,
    )
    return {
        "nodes_before": before,
        "nodes": gpu_nodes(),
        "fits": s.n_fits,
        "done": s.done,
        "failed": s.failed,
        "resources": s.resources,
        "trials": s.n_trials,
        "packs": [{k: p.get(k) for k in ("trial", "pack", "assigned_GPU", "assigned_CPU")} for p in s.packs],
        "seconds": s.seconds,
    }


def train() -> dict:
    """jobs/train_fewsound.py --smoke-test, then where its Ray Train workers ran."""
    from ray.util.state import list_actors

    sys.path.insert(0, str(REPO / "jobs"))
    import train_fewsound

    rc = train_fewsound.main(["--smoke-test", "--experiment", "test-autoscale-train"])
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=100)
    return {"rc": rc, "worker_nodes": [w.node_id for w in workers], "nodes": gpu_nodes()}


if __name__ == "__main__":
    result = {"sweep": sweep, "train": train}[sys.argv[1]]()
    print("RESULT " + json.dumps(result), flush=True)
