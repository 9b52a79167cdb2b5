"""The training job on real Ray: DDP correctness, and `ray job submit` of the smoke test against a dedicated
`ray start --head` started as cluster.yaml starts it (from the checkout, token authentication on), stopped
mid-training and resubmitted with the user's exact command, without --working-dir (resume).

The head node is ours alone: its own temp dir, ports and auth token file; it runs as `ray start --head --block`
in its own session, so the test stops it (and only it) with SIGTERM to that process - never `ray stop`, which
would kill every Ray on the machine, other people's test clusters included.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from support import REPO, VENV_BIN, RayHead  # tests/support.py

pytestmark = pytest.mark.system

CLIP = 2048


# ------------------------------------------------------------------------------------------------ DDP


def _ddp_step(config):
    """Ray Train worker: one DDP train_step on this rank's half of the global batch; rank 0 saves the result."""
    import ray.train
    import ray.train.torch

    from fewsound.hyper import HyperConfig, build_model
    from fewsound.train import TrainConfig, make_optimizer, train_step

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig(
        model=HyperConfig(target="kan", preset="tiny", clip_length=CLIP),
        lr=1e-4,
        batch_size=4,
        samples_per_epoch=4,
        epochs=100,
    )
    model = build_model(cfg.model, verbose=False)
    optimizer, scheduler = make_optimizer(model, cfg)
    ddp = ray.train.torch.prepare_model(model)
    batch = torch.from_numpy(np.load(config["batch"]))
    losses = train_step(ddp, batch[rank::world], optimizer, scheduler=scheduler)
    if rank == 0:
        torch.save(
            {
                "state": model.state_dict(),
                "grads": {n: p.grad for n, p in model.named_parameters()},
                "wrapped": type(ddp).__name__,
                "losses": losses,
            },
            config["out"],
        )
    ray.train.report({"rank": rank})


def test_ddp_step_equals_single_process_step_on_the_whole_batch(tmp_path, speech_clips):
    """Two CPU workers (gloo), two clips each: the averaged gradients and the updated weights equal one
    single-process step on all four clips."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from fewsound.hyper import HyperConfig, build_model
    from fewsound.train import TrainConfig, make_optimizer, peak_normalize_batch, train_step

    batch = peak_normalize_batch(np.stack([c.load()[11_025 : 11_025 + CLIP] for c in speech_clips[:4]]))
    np.save(tmp_path / "batch.npy", batch)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.shutdown()  # a local Ray an earlier module of this process left (its order differs under pytest -n)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        TorchTrainer(
            _ddp_step,
            train_loop_config={"batch": str(tmp_path / "batch.npy"), "out": str(tmp_path / "r0.pt")},
            scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="ddp", storage_path=str(tmp_path / "ray")),
        ).fit()
    finally:
        ray.shutdown()
    ddp = torch.load(tmp_path / "r0.pt", weights_only=False)
    assert ddp["wrapped"] == "DistributedDataParallel"

    cfg = TrainConfig(
        model=HyperConfig(target="kan", preset="tiny", clip_length=CLIP),
        lr=1e-4,
        batch_size=4,
        samples_per_epoch=4,
        epochs=100,
    )
    torch.set_num_threads(1)
    model = build_model(cfg.model, verbose=False)
    optimizer, scheduler = make_optimizer(model, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_step(model, torch.from_numpy(batch), optimizer, scheduler=scheduler)
    assert torch.allclose(ddp["losses"], losses[0::2], rtol=1e-5, atol=1e-7)  # rank 0 saw clips 0 and 2
    for name, p in model.named_parameters():
        g = ddp["grads"][name]
        # float32 sums over a batch split in two differ in rounding: compare at 1e-4 of each tensor's scale
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-4 * float(p.grad.abs().max()) + 1e-12), name
    moved = 0
    for k, v in model.state_dict().items():
        # AdamW's first step moves each weight by about lr: the DDP result must agree far below that
        assert torch.allclose(ddp["state"][k], v, rtol=0, atol=2e-6), (k, float((ddp["state"][k] - v).abs().max()))
        moved += int((v - before[k]).abs().max() > 5e-5)
    assert moved > 10  # the step did change the weights (lr 1e-4), so agreeing is not trivial


# ------------------------------------------------------------------------------------------------ ray job submit


class Head(NamedTuple):
    env: dict[str, str]  # RAY_AUTH_* (the token), FEWSOUND_HOME = home, the venv's PATH
    dashboard: str  # `ray job submit --address`
    gcs: str  # a driver's RAY_ADDRESS
    home: Path
    pid: int  # `ray start --head --block`: every Ray process of the cluster is under it


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A private `ray start --head --block` with token authentication, started from the checkout as cluster.yaml
    does (jobs submitted without --working-dir run there), with the head's MLflow server in its FEWSOUND_HOME:
    a Head (env for the CLI and drivers, dashboard address, GCS address, home, pid). Both job tests use it."""
    root = tmp_path_factory.mktemp("rayhead")
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))  # the documented way: RAY_AUTH_MODE=token + a token (here a file)
    token.chmod(0o600)
    home = root / "fewsound_home"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FEWSOUND_HOME": str(home),
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        # on SIGTERM the head stops at once; by default it first drains for up to 30 s, and a head that ran these
        # jobs never finishes draining: the module's teardown waited the whole 30 s
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    head = RayHead(root, env, extra=["--num-cpus", "2", "--num-gpus", "0"], dashboard=True, cwd=REPO).spawn()
    try:
        from fewsound.tracking import start_local_server

        # The head's MLflow server, started while the head boots (as cluster.yaml runs one beside the head): both
        # jobs find it in the head's FEWSOUND_HOME. A server the first job started would not outlive it: `ray job
        # stop` ends the job's whole process tree, and the second job would pay a server start again.
        start_local_server(home)
        assert head.wait_ready(), head.log_path.read_text(errors="replace")[-3000:]
        assert head.proc is not None
        yield Head(env, head.dashboard, head.gcs, home, head.proc.pid)
    finally:
        head.stop()
        from fewsound.tracking import stop_local_server

        stop_local_server(home)  # the MLflow server the job started for this FEWSOUND_HOME


def _train_workers(head_pid: int) -> list:
    """The Ray Train worker processes under OUR head node (other Ray clusters on the machine are left alone)."""
    import psutil

    out = []
    for proc in psutil.Process(head_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                out.append(proc)
        except psutil.Error:
            pass
    return out


def _ray(env, *args, timeout=600, cwd=REPO):
    return subprocess.run(
        [str(VENV_BIN / "ray"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_ray_job_submit_smoke_test_stopped_and_resumed(ray_head, processes):
    """`ray job submit --working-dir . -- python jobs/train_fewsound.py --smoke-test` on a token-authenticated
    head, stopped after its first checkpoint; then exactly `ray job submit -- python jobs/train_fewsound.py
    --smoke-test` (RAY_ADDRESS set, no --working-dir: the head runs its checkout) resumes from that checkpoint (same
    state digest, later epochs only), finishes, and completes the same MLflow run."""
    env, address, home = ray_head.env, ray_head.dashboard, ray_head.home
    entry = ["--", "python", "jobs/train_fewsound.py", "--smoke-test"]
    # without the token the cluster refuses us: authentication is really on (asked while the first job starts)
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    no_token["HOME"] = str(home.parent)  # no ~/.ray/auth_token there either
    refused = processes.start([str(VENV_BIN / "ray"), "job", "list", "--address", address], cwd=REPO, env=no_token,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    first = _ray(env, "job", "submit", "--address", address, "--working-dir", ".", "--no-wait", *entry)
    assert first.returncode == 0, first.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", first.stdout + first.stderr).group(0)
    storage = home / "train"
    deadline = time.monotonic() + 400
    while not any("epoch_00001" in p.read_text() for p in storage.glob("*/checkpoint_manager_snapshot.json")):
        assert time.monotonic() < deadline, _ray(env, "job", "logs", "--address", address, job_id).stdout[-4000:]
        time.sleep(0.3)
    # Freeze the training workers at once (SIGSTOP: no CLI start-up latency, so the job cannot finish
    # meanwhile on a fast machine), then stop the job the ordinary way: a kill in the middle of epoch 2 or 3.
    frozen = _train_workers(ray_head.pid)
    assert frozen, "no RayTrainWorker process under our head node"
    for proc in frozen:
        proc.send_signal(signal.SIGSTOP)
    stop = _ray(env, "job", "stop", "--address", address, job_id, timeout=180)
    for proc in frozen:
        if proc.is_running():
            proc.send_signal(signal.SIGCONT)  # let anything Ray did not reap exit on its own SIGTERM/SIGKILL
    # `ray job stop` waits for the job to end and then logs the status the cluster gives it (stopped, succeeded,
    # failed): the same answer as `ray job status`, without one more CLI start-up
    status = stop.stdout + stop.stderr
    assert stop.returncode == 0 and f"Job '{job_id}' was stopped" in status, status[-3000:]
    assert "stopped" in status.lower(), (status, stop.stdout[-2000:], stop.stderr[-2000:])
    r = refused.communicate(timeout=120)
    assert refused.returncode != 0, r[0]
    (run_dir,) = [p.parent for p in storage.glob("*/checkpoint_manager_snapshot.json")]
    digests = {
        int(p.parent.name.split("_")[1]): json.loads(p.read_text())["digest"] for p in run_dir.glob("epoch_*/meta.json")
    }
    assert digests and max(digests) < 3, digests  # stopped before the last (3rd) epoch

    # from another folder: the entrypoint is resolved in the head's folder (the checkout), not the client's
    second = _ray({**env, "RAY_ADDRESS": address}, "job", "submit", *entry, cwd=home.parent)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-5000:]
    assert "[train] asking for 2 CPU workers x 0.5 CPU (--num-workers 2; no GPUs in the cluster)" in out, out[-5000:]
    m = re.search(r"resumed after epoch (\d+) \(step (\d+)\); state digest (\w+)", out)
    assert m, out[-5000:]
    resumed = int(m.group(1))
    assert resumed in digests and m.group(3) == digests[resumed], (m.groups(), digests)
    trained = sorted({int(e) for e in re.findall(r"\[train\] epoch (\d+)/3", out)})
    assert trained == list(range(resumed + 1, 4)), trained
    assert "trained in" in out and "3 epochs on 2 CPU worker(s)" in out, out[-3000:]

    from mlflow.tracking import MlflowClient

    from fewsound.tracking import start_local_server

    client = MlflowClient(tracking_uri=start_local_server(home))
    exp = client.get_experiment_by_name("train_fewsound-smoke")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags.get("fewsound.resumed") == "true"
    epochs = sorted(int(x.value) for x in client.get_metric_history(run.info.run_id, "epoch"))
    assert epochs[-1] == 2 and set(epochs) == {0, 1, 2}
    assert {"val/loss", "eval/psnr", "universal/psnr", "train/loss_step", "model/params"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_file", "reconstructions"} <= artifacts, artifacts
    recon = client.list_artifacts(run.info.run_id, "reconstructions")
    assert recon and client.list_artifacts(run.info.run_id, recon[-1].path)
    logged = [lm for lm in client.search_logged_models([exp.experiment_id]) if lm.source_run_id == run.info.run_id]
    assert logged, "the final model was not logged with mlflow.pytorch.log_model"


def test_a_training_worker_killed_mid_epoch_resumes_from_its_last_checkpoint(ray_head, processes, tmp_path):
    """SIGKILL of one Ray Train worker in the middle of epoch 2 (the OOM killer, a lost spot node): Ray Train
    restarts the worker group, which resumes from the last checkpoint (the same state digest), trains only the
    epochs after it, and the run ends FINISHED with every epoch logged once.

    The job's driver runs here against the module's head (as a driver on the head node does), so it shares the
    head's start-up, prepared corpus and MLflow server; its run is its own: its own experiment and checkpoint
    storage."""
    experiment = "train_fewsound-smoke-killed"
    env = dict(ray_head.env, RAY_ADDRESS=ray_head.gcs, PYTHONPATH=str(REPO))
    snapshots = tmp_path / "train"
    cmd = [sys.executable, str(REPO / "jobs" / "train_fewsound.py"), "--smoke-test", "--experiment", experiment,
           "--storage", str(snapshots)]  # fmt: skip
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = processes.start(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 400
    while not any("epoch_00001" in p.read_text() for p in snapshots.glob("*/checkpoint_manager_snapshot.json")):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    workers = _train_workers(ray_head.pid)
    assert len(workers) == 2, workers
    workers[1].send_signal(signal.SIGKILL)
    # the checkpoints there are at the kill (Ray Train keeps only the latest few once training goes on)
    (run_dir,) = [p.parent for p in snapshots.glob("*/checkpoint_manager_snapshot.json")]
    metas = run_dir.glob("epoch_*/meta.json")
    digests = {int(p.parent.name.split("_")[1]): json.loads(p.read_text())["digest"] for p in metas}
    try:
        proc.wait(timeout=600)  # the `processes` fixture kills the driver if it is still running at the end
    except subprocess.TimeoutExpired:
        raise AssertionError(log.read_text()[-5000:]) from None
    assert proc.returncode == 0, log.read_text()[-5000:]
    out = log.read_text()
    m = re.search(r"resumed after epoch (\d+) \(step (\d+)\); state digest (\w+)", out)
    assert m, out[-5000:]
    resumed = int(m.group(1))
    assert resumed in digests and m.group(3) == digests[resumed], (m.groups(), digests)
    after = [int(e) for e in re.findall(r"\[train\] epoch (\d+)/3", out[m.end() :])]
    assert sorted(set(after)) == list(range(resumed + 1, 4)), after

    from mlflow.tracking import MlflowClient

    from fewsound.tracking import start_local_server

    client = MlflowClient(tracking_uri=start_local_server(ray_head.home))  # the head's server, already up
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    epochs = [int(x.value) for x in client.get_metric_history(run.info.run_id, "epoch")]
    assert sorted(set(epochs)) == [0, 1, 2], epochs
