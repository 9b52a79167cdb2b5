"""A multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`: a head with no CPUs, as in cluster.yaml,
plus two worker nodes): a smoke sweep spreads its trials over the worker nodes, and every child run's
artifacts reach the MLflow server over HTTP."""

from __future__ import annotations

import pytest

from fewsound import tracking
from fewsound.fit import FitConfig
from fewsound.plan import FitTask
from tune.spine import FIT_KEY_TAG

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    from tune.ray_env import quiet_defaults

    ray.shutdown()  # an earlier test module's Ray in this process must not stand in for the cluster
    home = tmp_path_factory.mktemp("multinode-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEWSOUND_HOME", str(home))
        uri = tracking.start_local_server(home=home)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        quiet_defaults()
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # like cluster.yaml: no trials on the head
        workers = [c.add_node(num_cpus=1) for _ in range(2)]
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level="WARNING")
        try:
            yield c, [w.node_id for w in workers], uri
        finally:
            ray.shutdown()
            c.shutdown()
            tracking.stop_local_server(home)


def test_smoke_sweep_spreads_over_worker_nodes_and_logs_every_artifact(cluster):
    import ray
    from mlflow.tracking import MlflowClient

    from tune.jobs import corpus_clips, resolve_corpus
    from tune.sweep import run_sweep

    c, worker_ids, uri = cluster
    assert ray.get_runtime_context().gcs_address == c.address
    corpus = resolve_corpus(None, 16_384)
    clips = corpus_clips(corpus, "3", "speech")
    tasks = [
        FitTask(FitConfig(family=f, steps=3), clip.clip_id, clip.kind, 16_384, f.upper())
        for f in ("nerf", "kan")
        for clip in clips
    ]
    s = run_sweep(
        "multinode",
        tasks,
        corpus=corpus,
        experiment="test-multinode",
        address=c.address,
        pack_size=3,
        progress=False,
        metrics=("mse", "psnr", "lsd"),
    )
    assert (s.done, s.failed) == (6, 0)
    assert s.resources == {"cpu": 1}  # no GPUs in this cluster: trials ask for CPUs only

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("test-multinode")
    kids = [r for r in client.search_runs([exp.experiment_id]) if FIT_KEY_TAG in r.data.tags]
    assert len(kids) == 6 and all(r.info.status == "FINISHED" for r in kids)
    nodes = {r.data.tags["fewsound.node"] for r in kids}
    assert nodes == set(worker_ids), "the two packs ran on the two worker nodes, none on the head"
    for r in kids:
        files = {a.path for a in client.list_artifacts(r.info.run_id, "audio")}
        files |= {a.path for a in client.list_artifacts(r.info.run_id, "plots")}
        assert files == {"audio/pred.flac", "plots/spectrogram.png"}, r.info.run_name  # the target: on the parent
        assert r.data.tags["fewsound.target_audio"].startswith("targets/"), r.info.run_name
        assert "eval/lsd" in r.data.metrics
