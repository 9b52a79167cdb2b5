"""FewSound / HyperSound training on Ray Train (V2 API): what jobs/train_fewsound.py runs.

    summary = run_training(TrainConfig(...), corpus=None)      # None: the built-in corpus (fewsound protocol)

Driver (this process):
1. Start or join Ray: `--address`, else $RAY_ADDRESS (set by `ray job submit`), else a new LOCAL Ray
   (address="local": never attach by accident to another Ray running on the same machine).
2. Workers (tune.ray_env.choose_scaling): with GPUs, one GPU per worker, by default as many as one node of the
   multi-GPU type has (FEWSOUND_TRAIN_GPUS), pinned to that type (its custom resource); else CPU workers (default
   2) that share all CPUs but one, which is left to Ray Data's readers. The job's first line says which and why.
   Workers without a CUDA device (an emulated cluster's fake GPUs) train on their CPUs with gloo.
3. The run's key `train-{kind}-{target}-{hash8 of config, corpus and experiment}` names both the Ray Train run
   (its folder under the storage path, local or a cloud URI) and the MLflow run (tag fewsound.train_key).
   Re-running the same command finds both: Ray Train V2 restores its run from the storage folder and hands the
   workers the latest checkpoint; the unfinished MLflow run is reopened, so curves continue in the same run. A run
   already FINISHED in MLflow is not trained again.
4. Data: `ray.data.read_parquet` of the corpus's shards. "train" is split between the workers
   (`get_dataset_shard`, a streaming split: no process holds the corpus); each worker crops its rows at random
   and peak-normalises them. A worker whose share is small (<= 512 MiB, e.g. the built-in corpus) keeps it after
   the first pass instead of paying Ray Data's per-pass start-up for every few batches. "validation" (filtered
   to the fixed validation subset) is not split: worker r keeps the subset's clips r, r + W, ... and caches its crops.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path
from typing import Any

from fewsound.config import cfg_hash, flatten, to_dict
from fewsound.errors import ConfigError, DataError, Stopped
from fewsound.train import TrainConfig
from tune.hyper.data import quiet_ray_data, read_splits
from tune.hyper.worker import train_loop_per_worker
from tune.ray_env import choose_scaling, init_ray, storage_root, workers_have_cuda
from tune.spine import (
    KIND_TAG,
    TARGET_TAG,
    TRAIN_KEY_TAG,
    StopOnSignal,
    open_keyed_run,
)

CACHE_BYTES = 512 << 20  # a worker keeps its share of the training split in memory when it is at most this


def resolve_train_corpus(corpus: str | None, clip_length: int) -> str:
    """Where training reads: `corpus` (a folder every node mounts, s3://..., gs://..., builtin:<protocol>), checked
    for train/validation clips of `clip_length` samples; None: the built-in corpus by name (builtin:fewsound)."""
    from fewsound.data.builtin import builtin_name
    from fewsound.data.corpus import corpus_location, open_corpus

    corpus = corpus_location(corpus if corpus is not None else builtin_name("fewsound"))
    c = open_corpus(corpus)
    for split in ("train", "validation"):
        if c.count(split) == 0:
            raise DataError(
                corpus, f"has no {split!r} clips; prepare it with `jobs/prepare_data.py --protocol fewsound`"
            )
    if c.manifest["stored_length"] < clip_length:
        raise DataError(corpus, f"stores {c.manifest['stored_length']}-sample clips, the model needs {clip_length}")
    return corpus


def run_key(cfg: TrainConfig, corpus: str, experiment: str) -> str:
    """What identifies a run: the config, the corpus and the MLflow experiment it is recorded in."""
    h = cfg_hash({"cfg": to_dict(cfg), "corpus": corpus, "experiment": experiment})
    return f"train-{cfg.model.kind}-{cfg.model.target}-{h}"


def open_mlflow_run(experiment: str, key: str, params: dict[str, Any], tags: dict[str, Any]):
    """(MlflowRun, finished): the FINISHED run of `key` if any, else its latest unfinished run (reopened, for a
    resume), else a new one with the params logged."""
    keyed = open_keyed_run(experiment, TRAIN_KEY_TAG, key, run_name=key, tags=tags, role=None, reopen_finished=False)
    if keyed.created:
        keyed.run.log_params(params)
    return keyed.run, keyed.status == "FINISHED"


def validation_plan(corpus: str, cfg: TrainConfig) -> tuple[list[str], list[str], list[str]]:
    """(subset clip ids, their kinds, ids whose audio is logged), from the clip_id/kind columns only."""
    from fewsound.data.corpus import open_corpus
    from fewsound.train import choose_validation

    t = open_corpus(corpus).table("validation", columns=["clip_id", "kind"])
    ids, kinds = t.column("clip_id").to_pylist(), t.column("kind").to_pylist()
    subset, logged = choose_validation(ids, kinds, cfg.val_clips, cfg.log_clips, seed=0)
    return [ids[i] for i in subset], [kinds[i] for i in subset], [ids[i] for i in logged]


@dataclasses.dataclass
class TrainSummary:
    key: str
    experiment: str
    run_id: str
    tracking_uri: str
    storage: str
    already_finished: bool
    epochs_done: int
    metrics: dict[str, float]
    checkpoint: str | None
    seconds: float
    workers: int
    use_gpu: bool
    experiment_id: str | None = None

    @property
    def ui_url(self) -> str:
        """The training's run in MLflow's UI (its model-training layout)."""
        from fewsound.tracking import ui_url

        return ui_url(self.tracking_uri, self.experiment_id, self.run_id)


def run_training(
    cfg: TrainConfig,
    *,
    corpus: str | None = None,
    storage: str | None = None,
    name: str | None = None,
    experiment: str = "train_fewsound",
    num_workers: int | None = None,
    address: str | None = None,
    max_failures: int = 3,
    keep_checkpoints: int = 2,
    tags: dict[str, Any] | None = None,
) -> TrainSummary:
    """Train (or resume, or report an already finished run of) `cfg` with Ray Train. See the module docstring.
    `tags`: more tags of a new MLflow run (e.g. mlflow.parentRunId: a grid's child run)."""
    t0 = time.perf_counter()
    if keep_checkpoints < 1:
        raise ConfigError("--keep-checkpoints", f"must be >= 1, got {keep_checkpoints}")
    plan = _plan(cfg, corpus, storage, name, experiment, num_workers, address)
    run, finished = open_mlflow_run(
        experiment, plan.key, plan.params(), {KIND_TAG: cfg.model.kind, TARGET_TAG: cfg.model.target, **(tags or {})}
    )
    if finished:
        metrics = run.client.get_run(run.run_id).data.metrics
        return plan.summary(run, metrics, already_finished=True, checkpoint=None, t0=t0)
    trainer = _trainer(plan, run.run_id, max_failures, keep_checkpoints)
    guard = StopOnSignal(interrupt=True)
    try:
        with guard:
            result = trainer.fit()
    except KeyboardInterrupt:  # SIGINT/SIGTERM: the workers stop with this driver; the checkpoints stay
        run.end("KILLED")
        raise Stopped(
            guard.signal or signal.SIGINT,
            f"training stopped; re-run the same command to resume from its last checkpoint in {plan.storage}/"
            f"{plan.key}",
        ) from None
    except BaseException:
        run.end("FAILED")  # re-running the same command reopens this run and resumes from the last checkpoint
        raise
    run.end("FINISHED")
    checkpoint = result.checkpoint.path if result.checkpoint else None
    return plan.summary(run, dict(result.metrics or {}), already_finished=False, checkpoint=checkpoint, t0=t0)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a training settled before it starts: its corpus, workers, key, storage and validation subset."""

    cfg: TrainConfig
    corpus: str
    uri: str  # the tracking server (workers inherit it)
    scaling: Any  # ray.train.ScalingConfig
    cpu_each: float
    key: str
    storage: str
    experiment: str
    val_ids: list[str]
    val_kinds: list[str]
    log_ids: list[str]

    def params(self) -> dict[str, Any]:
        """The MLflow run's params: the config flattened, the data, the workers, the resolved learning rate."""
        cfg = self.cfg
        return {
            **flatten(cfg),
            "data.corpus": self.corpus,
            "data.val_subset": len(self.val_ids),
            "ray.num_workers": self.scaling.num_workers,
            "ray.use_gpu": self.scaling.use_gpu,
            "ray.cpus_per_worker": self.cpu_each,
            "ray.storage": self.storage,
            "lr.resolved": cfg.resolved_lr,
            "lr.peak": cfg.resolved_lr * cfg.div_factor,
            "steps_per_epoch": cfg.steps_per_epoch,
        }

    def summary(
        self, run: Any, metrics: dict[str, float], *, already_finished: bool, checkpoint: str | None, t0: float
    ) -> TrainSummary:
        return TrainSummary(
            key=self.key,
            experiment=self.experiment,
            run_id=run.run_id,
            tracking_uri=self.uri,
            storage=self.storage,
            already_finished=already_finished,
            epochs_done=int(metrics.get("epoch", -1)) + 1,
            metrics=metrics,
            checkpoint=checkpoint,
            seconds=time.perf_counter() - t0,
            workers=self.scaling.num_workers,
            use_gpu=self.scaling.use_gpu,
            experiment_id=run.experiment_id,
        )


def _plan(
    cfg: TrainConfig,
    corpus: str | None,
    storage: str | None,
    name: str | None,
    experiment: str,
    num_workers: int | None,
    address: str | None,
) -> _Plan:
    """The corpus checked, Ray started or joined, the workers chosen (the job's first line says which and why)."""
    from fewsound.tracking import tracking_uri

    corpus = resolve_train_corpus(corpus, cfg.model.clip_length)
    uri = tracking_uri()  # before Ray starts, so that workers inherit MLFLOW_TRACKING_URI
    scaling, cpu_each, why = choose_scaling(init_ray(address), num_workers)
    _announce_workers(scaling, cpu_each, why)
    if cfg.batch_size % scaling.num_workers:
        raise ConfigError(
            "batch_size", f"the global batch {cfg.batch_size} does not split evenly over {scaling.num_workers} workers"
        )
    storage = storage or storage_root("train")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    val_ids, val_kinds, log_ids = validation_plan(corpus, cfg)
    key = name or run_key(cfg, corpus, experiment)
    return _Plan(cfg, corpus, uri, scaling, cpu_each, key, storage, experiment, val_ids, val_kinds, log_ids)


def _trainer(plan: _Plan, run_id: str, max_failures: int, keep_checkpoints: int) -> Any:
    """Ray Train's TorchTrainer of the plan: the worker function, its config, the splits, storage and retries."""
    import ray.train
    from ray.data.expressions import col
    from ray.train.torch import TorchTrainer

    from fewsound.data.corpus import open_corpus

    quiet_ray_data()
    c = open_corpus(plan.corpus)
    train_ds, val_ds = read_splits(c, plan.corpus)
    val_ds = val_ds.filter(expr=col("clip_id").is_in(plan.val_ids))
    share = c.count("train") * int(c.manifest["stored_length"]) * 4 / plan.scaling.num_workers
    loop_config = {
        "train": to_dict(plan.cfg),
        "run_id": run_id,
        "cache_train": share <= CACHE_BYTES,
        "tracking_uri": plan.uri,
        "experiment": plan.experiment,
        "val_ids": plan.val_ids,
        "val_kinds": plan.val_kinds,
        "log_ids": plan.log_ids,
        "cpus_per_worker": plan.cpu_each,
        "key": plan.key,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=plan.scaling,
        torch_config=_torch_config(plan.scaling),
        run_config=ray.train.RunConfig(
            name=plan.key,
            storage_path=plan.storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            worker_runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": plan.uri}},
        ),
        datasets={"train": train_ds, "validation": val_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def _announce_workers(scaling: Any, cpu_each: float, why: str) -> None:
    """The job's first line: what training asks Ray for, and why."""
    n = scaling.num_workers
    if not scaling.use_gpu:
        print(f"[train] asking for {n} CPU workers x {cpu_each:g} CPU ({why})", flush=True)
        return
    extra = [k for k in scaling.resources_per_worker if k not in ("CPU", "GPU")]
    where = f" on nodes with {', '.join(extra)}" if extra else ""
    print(f"[train] asking for {n} GPU workers x (1 GPU + {cpu_each:g} CPU){where} ({why})", flush=True)


def _torch_config(scaling: Any):
    """NCCL where the workers see CUDA devices; gloo on CPU workers and on GPUs without CUDA (an emulated
    cluster's fake GPUs), whose workers then train on their CPUs."""
    from ray.train.torch import TorchConfig

    if not scaling.use_gpu:
        return TorchConfig()
    if workers_have_cuda(scaling.resources_per_worker):
        return TorchConfig(backend="nccl")
    print("[train] the workers' GPUs have no CUDA device: training on their CPUs (gloo)", flush=True)
    return TorchConfig(backend="gloo")
