"""The Ray environment of every job (sweeps, search, training): joining or starting Ray, quiet defaults, what a
trial or a training worker asks for, where Ray keeps its state, and how big the cluster can grow.

A cluster whose GPU nodes scale from zero shows no GPU (and, with a 0-CPU head, no CPU) when a job starts; a job
that sized itself from what is up would plan one trial slot and never make the autoscaler start a node. So jobs
plan for the cluster's ceiling, which the cluster states in the environment of its nodes (cluster.yaml sets
these on every node; a laptop sets none and gets what it has):

  FEWSOUND_MAX_GPUS, FEWSOUND_MAX_CPUS  what the autoscaler may start in all (sum over node types of
                      max_workers x resources); a sweep plans its trial slots for it, pending trials make the
                      autoscaler start nodes. The larger of this and what is up now counts.
  FEWSOUND_TRAIN_GPUS, FEWSOUND_TRAIN_CPUS  one node of the multi-GPU type training runs on; that type carries
                      the custom resource TRAIN_RESOURCE, which every training worker asks for (pinned there).
  FEWSOUND_USE_GPU    auto (default: GPUs when the cluster has or can grow some), 1 (always), 0 (never).
  FEWSOUND_STORAGE    where Ray Tune / Ray Train keep state (a URI every node reaches; default $FEWSOUND_HOME).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import ray

from fewsound.errors import ConfigError
from fewsound.storage import storage_root
from tune.spine import env_number
from tune.worker_setup import WORKER_SETUP_HOOK, quiet_exits

__all__ = [
    "GPU_FRACTIONS",
    "TRAIN_RESOURCE",
    "Capacity",
    "capacity",
    "choose_scaling",
    "cpu_means_cpu",
    "init_ray",
    "quiet_defaults",
    "quiet_exits",
    "storage_root",
    "trial_resources",
    "trial_slots",
    "tune_errors_silenced",
    "use_gpus",
    "workers_have_cuda",
]

GPU_FRACTIONS = (1.0, 0.5, 0.25, 0.125)  # fractions that divide one GPU exactly
TRAIN_RESOURCE = "gpu_multi"  # custom resource of the multi-GPU node type (cluster.yaml)
DEFAULT_CPU_WORKERS = 2
# Two documented switches keep the libraries quiet; each is only a default (os.environ.setdefault), so a user can
# turn it back on. RAY_AIR_NEW_OUTPUT=0 with RunConfig(verbose=0): Tune's legacy reporter at verbosity 0 prints
# nothing (the new engine prints its configuration box and hints even at verbose=0).
# MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=true: no "View run ... at" line (and no get_run call) per child run.
# MLFLOW_DISABLE_TELEMETRY=true: see fewsound.tracking (its thread races the trials' logging threads).
QUIET_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
# what a job's Ray workers inherit from the driver (Ray workers on other nodes do not see the driver's shell)
# Passed to workers in the job's runtime_env (visible in the dashboard: no secrets here). MLflow's credentials
# (MLFLOW_TRACKING_USERNAME/PASSWORD) reach workers from the environment Ray was started in: a local Ray's raylet
# inherits the driver's, a cluster's nodes have them from their own start (cluster.yaml).
WORKER_ENV = ("MLFLOW_TRACKING_URI", *QUIET_ENV)


def quiet_defaults() -> None:
    """Turn the libraries' chatter off unless the user set these variables (see QUIET_ENV)."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


@contextlib.contextmanager
def tune_errors_silenced():
    """Ray Tune logs every failed trial attempt with its whole traceback on the "ray.tune" logger (Ray's documented
    logger for Tune). A sweep prints each failed fit once, with the reason recorded on its child run, instead."""
    logger = logging.getLogger("ray.tune")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Join the cluster at `address` (or $RAY_ADDRESS, as under `ray job submit`), else start a new LOCAL Ray
    (address="local": never attach by accident to another Ray on the same machine). Returns the resources up now.

    Workers' output reaches the driver (log_to_driver): what a failing trial prints is in the terminal and in
    `ray job logs`. Every worker of the job runs tune.worker_setup's hook first (runtime_env's
    worker_process_setup_hook). num_cpus/num_gpus: of a local Ray started here (default: the machine's, at least
    2 CPUs).
    """
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        env_vars = {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}
        runtime_env: dict = {"worker_process_setup_hook": WORKER_SETUP_HOOK}  # from each worker's start
        if env_vars:
            runtime_env["env_vars"] = env_vars
        kw = dict(runtime_env=runtime_env, logging_level=logging.WARNING)
        if address:
            ray.init(address=address, **kw)
        else:
            cpus = num_cpus if num_cpus is not None else max(2, os.cpu_count() or 2)
            ray.init(address="local", num_cpus=cpus, num_gpus=num_gpus, include_dashboard=False, **kw)
    return ray.cluster_resources()


@dataclasses.dataclass(frozen=True)
class Capacity:
    """What a job plans for: the cluster's CPUs and GPUs at its ceiling (or now, where no ceiling is set)."""

    cpus: float
    gpus: float
    now_cpus: float
    now_gpus: float
    ceiling: bool  # True: from FEWSOUND_MAX_* (the cluster can grow to it); False: the resources up now

    def describe(self) -> str:
        """e.g. '8 GPUs, 32 CPUs (cluster ceiling from FEWSOUND_MAX_GPUS/FEWSOUND_MAX_CPUS; up now: 0 GPUs, 0 CPUs)'."""
        what = f"{self.gpus:g} GPUs, {self.cpus:g} CPUs"
        if self.ceiling:
            now = f"up now: {self.now_gpus:g} GPUs, {self.now_cpus:g} CPUs"
            return f"{what} (cluster ceiling from FEWSOUND_MAX_GPUS/FEWSOUND_MAX_CPUS; {now})"
        return f"{what} (the resources up now; set FEWSOUND_MAX_GPUS/FEWSOUND_MAX_CPUS to plan for an autoscaler)"


def capacity(cluster: dict) -> Capacity:
    """The cluster's capacity: the larger of its ceiling (FEWSOUND_MAX_GPUS/_CPUS) and `cluster` (what is up)."""
    now_cpus, now_gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    max_cpus, max_gpus = env_number("FEWSOUND_MAX_CPUS"), env_number("FEWSOUND_MAX_GPUS")
    return Capacity(
        cpus=max(now_cpus, max_cpus or 0.0),
        gpus=max(now_gpus, max_gpus or 0.0),
        now_cpus=now_cpus,
        now_gpus=now_gpus,
        ceiling=max_cpus is not None or max_gpus is not None,
    )


def use_gpus(cap: Capacity) -> bool:
    """Whether jobs ask Ray for GPUs (FEWSOUND_USE_GPU=auto|1|0; auto: the cluster has or can grow GPUs). Never a
    GPU request on a cluster that cannot have one: it would pend forever."""
    mode = os.environ.get("FEWSOUND_USE_GPU", "auto").strip().lower()
    if mode in ("1", "true", "yes"):
        return True
    if mode in ("0", "false", "no"):
        return False
    if mode != "auto":
        raise ConfigError("FEWSOUND_USE_GPU", f"{mode!r} is not one of auto, 1, 0")
    return cap.gpus > 0


def check_gpu_fraction(gpu_fraction: float) -> None:
    if gpu_fraction not in GPU_FRACTIONS:
        raise ConfigError("gpu_fraction", f"{gpu_fraction} does not divide one GPU; use one of {GPU_FRACTIONS}")


def trial_resources(cap: Capacity, gpu_fraction: float = 0.25) -> dict[str, float]:
    """What one trial asks for: a GPU fraction when jobs use GPUs, else one CPU. Either way one CPU, hence one
    torch thread per trial."""
    check_gpu_fraction(gpu_fraction)
    return {"cpu": 1, "gpu": gpu_fraction} if use_gpus(cap) else {"cpu": 1}


def trial_slots(cap: Capacity, resources: dict[str, float], max_concurrent: int | None = None) -> int:
    """How many trials asking for `resources` the cluster runs at once at its capacity (at least 1), capped by
    `max_concurrent`. A bound that is unknown (0 CPUs or 0 GPUs at capacity) does not count."""
    bounds = [cap.cpus / resources["cpu"]] if cap.cpus > 0 else []
    if resources.get("gpu") and cap.gpus > 0:
        bounds.append(cap.gpus / resources["gpu"])
    n = max(1, int(min(bounds) + 1e-9)) if bounds else 1
    return min(n, max_concurrent) if max_concurrent else n


def fraction_text(resources: dict[str, float]) -> str:
    """{'cpu': 1, 'gpu': 0.25} -> '1/4 GPU + 1 CPU'."""
    gpu = resources.get("gpu")
    cpu = f"{resources['cpu']:g} CPU"
    if not gpu:
        return cpu
    return f"{'1' if gpu == 1 else f'1/{round(1 / gpu)}'} GPU + {cpu}"


def _train_node() -> tuple[float | None, float | None]:
    return env_number("FEWSOUND_TRAIN_GPUS"), env_number("FEWSOUND_TRAIN_CPUS")


def choose_scaling(cluster: dict, num_workers: int | None = None):
    """(ScalingConfig, CPUs per worker, why) for Ray Train on this cluster.

    With GPUs: one GPU per worker; default workers = the GPUs of one multi-GPU node (FEWSOUND_TRAIN_GPUS; that
    node type carries TRAIN_RESOURCE and every worker asks for it, so all land there), else the GPUs up now.
    Without: CPU workers (default 2) sharing all CPUs but one, which is left to Ray Data's read tasks (without
    it the data pipeline starves next to the workers).
    """
    from ray.train import ScalingConfig

    if num_workers is not None and num_workers < 1:
        raise ConfigError("--num-workers", f"must be >= 1, got {num_workers}")
    cap = capacity(cluster)
    asked = f"--num-workers {num_workers}" if num_workers else None
    if use_gpus(cap):
        node_gpus, node_cpus = _train_node()
        pinned = node_gpus is not None and node_gpus >= 1
        n = num_workers or int(node_gpus if pinned else max(cap.now_gpus, 1))
        cpus = node_cpus if pinned and node_cpus else cap.now_cpus
        cpu_each = max(1.0, min(4.0, float(int((cpus - 1) // n)))) if cpus > n else 0.5
        per_worker = {"CPU": cpu_each, "GPU": 1}
        if pinned:
            per_worker[TRAIN_RESOURCE] = 1
            why = f"{asked or f'one {TRAIN_RESOURCE} node: FEWSOUND_TRAIN_GPUS={node_gpus:g}'}; pinned to it"
        else:
            why = asked or f"the {cap.now_gpus:g} GPUs up now (FEWSOUND_TRAIN_GPUS unset)"
        return ScalingConfig(num_workers=n, use_gpu=True, resources_per_worker=per_worker), cpu_each, why
    n = num_workers or DEFAULT_CPU_WORKERS
    spare = cap.now_cpus - 1  # one CPU for Ray Data's read tasks
    if spare / n < 0.25:
        raise ConfigError(
            "--num-workers",
            f"{n} CPU workers do not fit a cluster of {cap.now_cpus:g} CPUs (one is kept for Ray Data); "
            "ask for fewer workers",
        )
    cpu_each = spare / n if spare / n < 1 else float(int(spare // n))
    why = f"{asked or f'default {DEFAULT_CPU_WORKERS}'}; no GPUs in the cluster"
    return ScalingConfig(num_workers=n, use_gpu=False, resources_per_worker={"CPU": cpu_each}), cpu_each, why


def cpu_means_cpu() -> bool:
    """First thing in a Ray task, actor or trial body: given no GPU (ray.get_gpu_ids() empty), hide every GPU of
    the node from torch and CDPAM (CUDA_VISIBLE_DEVICES="", fewsound.device.hide_gpus), so `device="auto"` means
    the CPU. Ray 2.60 sets CUDA_VISIBLE_DEVICES only for workers given GPUs; a 0-GPU worker on a GPU node would
    otherwise see them all and put its work on cuda:0, outside Ray's accounting. Returns whether they were hidden.
    It must run before the process first asks torch about CUDA (the driver reads the variable once)."""
    from fewsound.device import hide_gpus

    return hide_gpus(ray.get_gpu_ids())


@ray.remote(num_cpus=0)
def _cuda_available() -> bool:
    import torch

    cpu_means_cpu()

    return torch.cuda.is_available()


def workers_have_cuda(resources_per_worker: dict[str, float]) -> bool:
    """Whether a worker placed like a training worker sees a CUDA device: on an emulated cluster (fake GPUs) or a
    node without a driver it does not, and training then runs on the CPU with gloo instead of NCCL. The probe
    waits for the node the autoscaler starts, which training needs anyway."""
    extra = {k: v for k, v in resources_per_worker.items() if k not in ("CPU", "GPU")}
    probe = _cuda_available.options(num_gpus=resources_per_worker.get("GPU", 0), resources=extra or None)
    return bool(ray.get(probe.remote()))
