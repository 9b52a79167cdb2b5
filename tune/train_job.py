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

Workers (`train_loop_per_worker`): build the model from the config (same seed on every rank), restore the latest
checkpoint if any, wrap in DDP (`prepare_model`), then per epoch: `fewsound.train.run_epoch`, the mean loss
over ranks, validation every `val_every` epochs (metrics per rank, gathered on rank 0), and
`ray.train.report` with a checkpoint written by rank 0 (state + meta.json with the state digest). Rank 0 alone
talks to MLflow: curves, validation metrics, audio and spectrograms of the logged clips, and at the end the
model (fewsound's own file and an MLflow PyTorch model). Rank 0 also writes the job log's progress: a line at
most every 30 s within an epoch and one per epoch, with samples/s and the ETA of the whole run (`Progress`).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fewsound.config import cfg_hash, flatten, to_dict
from fewsound.errors import ConfigError, DataError, Stopped
from fewsound.train import TrainConfig
from tune.ray_env import choose_scaling, cpu_means_cpu, init_ray, storage_root, workers_have_cuda

KEY_TAG = "fewsound.train_key"
RESUME_TAG = "fewsound.resumed"
CACHE_BYTES = 512 << 20  # a worker keeps its share of the training split in memory when it is at most this
MODEL_FILE = "fewsound_model.pt"


# --------------------------------------------------------------------------------------------- driver helpers


def resolve_train_corpus(corpus: str | None, clip_length: int) -> str:
    """Where training reads: `corpus` (a folder every node mounts, s3://..., gs://..., builtin:<protocol>), checked
    for train/validation clips of `clip_length` samples; None: the built-in corpus by name (builtin:fewsound)."""
    from fewsound.data.builtin import builtin_name
    from fewsound.data.shards import corpus_location, open_corpus

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


def quiet_ray_data() -> None:
    """No Ray Data progress bars: redrawn many times a second by every worker, they bury the training log."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def open_mlflow_run(experiment: str, key: str, params: dict[str, Any], tags: dict[str, Any]):
    """(MlflowRun, finished): the FINISHED run of `key` if any, else its latest unfinished run (reopened, for a
    resume), else a new one with the params logged."""
    from mlflow.tracking import MlflowClient

    from fewsound.tracking import MlflowRun, get_or_create_experiment, tracking_uri

    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    exp_id = get_or_create_experiment(client, experiment)
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", order_by=["attributes.start_time DESC"], max_results=50
    )
    done = [r for r in runs if r.info.status == "FINISHED"]
    if done:
        return MlflowRun(experiment, uri=uri, run_id=done[0].info.run_id), True
    if runs:
        run = MlflowRun(experiment, uri=uri, run_id=runs[0].info.run_id)
        client.update_run(run.run_id, status="RUNNING")
        return run, False
    run = MlflowRun(experiment, uri=uri, run_name=key, tags={KEY_TAG: key, **tags})
    run.log_params(params)
    return run, False


def validation_plan(corpus: str, cfg: TrainConfig) -> tuple[list[str], list[str], list[str]]:
    """(subset clip ids, their kinds, ids whose audio is logged), from the clip_id/kind columns only."""
    from fewsound.data.shards import open_corpus
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
    import ray
    import ray.data
    import ray.train
    from ray.data.expressions import col
    from ray.train.torch import TorchTrainer

    from fewsound.tracking import tracking_uri
    from tune.stopping import interrupt_on_signal

    t0 = time.perf_counter()
    if keep_checkpoints < 1:
        raise ConfigError("--keep-checkpoints", f"must be >= 1, got {keep_checkpoints}")
    corpus = resolve_train_corpus(corpus, cfg.model.clip_length)
    uri = tracking_uri()  # before Ray starts, so that workers inherit MLFLOW_TRACKING_URI
    scaling, cpu_each, why = choose_scaling(init_ray(address), num_workers)
    _announce_workers(scaling, cpu_each, why)
    if cfg.batch_size % scaling.num_workers:
        raise ConfigError(
            "batch_size", f"the global batch {cfg.batch_size} does not split evenly over {scaling.num_workers} workers"
        )
    key = name or run_key(cfg, corpus, experiment)
    storage = storage or storage_root("train")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    val_ids, val_kinds, log_ids = validation_plan(corpus, cfg)
    params = {
        **flatten(cfg),
        "data.corpus": corpus,
        "data.val_subset": len(val_ids),
        "ray.num_workers": scaling.num_workers,
        "ray.use_gpu": scaling.use_gpu,
        "ray.cpus_per_worker": cpu_each,
        "ray.storage": storage,
        "lr.resolved": cfg.resolved_lr,
        "lr.peak": cfg.resolved_lr * cfg.div_factor,
        "steps_per_epoch": cfg.steps_per_epoch,
    }
    run, finished = open_mlflow_run(
        experiment, key, params, {"fewsound.kind": cfg.model.kind, "fewsound.target": cfg.model.target, **(tags or {})}
    )
    if finished:
        m = run.client.get_run(run.run_id).data.metrics
        return TrainSummary(
            key,
            experiment,
            run.run_id,
            uri,
            storage,
            True,
            int(m.get("epoch", -1)) + 1,
            m,
            None,
            time.perf_counter() - t0,
            scaling.num_workers,
            scaling.use_gpu,
            run.experiment_id,
        )

    from fewsound.data.shards import open_corpus

    quiet_ray_data()
    c = open_corpus(corpus)
    train_ds, val_ds = read_splits(c, corpus)
    val_ds = val_ds.filter(expr=col("clip_id").is_in(val_ids))
    share = c.count("train") * int(c.manifest["stored_length"]) * 4 / scaling.num_workers
    loop_config = {
        "train": to_dict(cfg),
        "run_id": run.run_id,
        "cache_train": share <= CACHE_BYTES,
        "tracking_uri": uri,
        "experiment": experiment,
        "val_ids": val_ids,
        "val_kinds": val_kinds,
        "log_ids": log_ids,
        "cpus_per_worker": cpu_each,
        "key": key,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        torch_config=_torch_config(scaling),
        run_config=ray.train.RunConfig(
            name=key,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            worker_runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": uri}},
        ),
        datasets={"train": train_ds, "validation": val_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    guard = interrupt_on_signal()
    try:
        with guard:
            result = trainer.fit()
    except KeyboardInterrupt:  # SIGINT/SIGTERM: the workers stop with this driver; the checkpoints stay
        run.end("KILLED")
        raise Stopped(
            guard.signum or signal.SIGINT,
            f"training stopped; re-run the same command to resume from its last checkpoint in {storage}/{key}",
        ) from None
    except BaseException:
        run.end("FAILED")  # re-running the same command reopens this run and resumes from the last checkpoint
        raise
    run.end("FINISHED")
    metrics = dict(result.metrics or {})
    return TrainSummary(
        key,
        experiment,
        run.run_id,
        uri,
        storage,
        False,
        int(metrics.get("epoch", -1)) + 1,
        metrics,
        result.checkpoint.path if result.checkpoint else None,
        time.perf_counter() - t0,
        scaling.num_workers,
        scaling.use_gpu,
    )


def read_splits(c: Any, corpus: str) -> tuple[Any, Any]:
    """Ray Datasets of the train and validation splits (clip_id, audio). A corpus at a URI or on a shared mount
    is streamed by Ray Data's readers, on whichever nodes they run, from its shards (each reader opens its
    shards through pyarrow.fs, like fewsound.storage). The built-in corpus (builtin:<protocol>) is prepared on
    each machine that opens it; Ray Data's readers may run on a node that has not, so the driver reads its few
    MB and hands them to Ray's object store (ray.data.from_arrow), which every node reaches."""
    import ray.data

    from fewsound import storage
    from fewsound.data.builtin import SCHEME

    columns = ["clip_id", "audio"]
    if corpus.startswith(SCHEME):
        return ray.data.from_arrow(c.table("train", columns)), ray.data.from_arrow(c.table("validation", columns))
    fs = storage.location(c.location)[0]  # the same filesystem (and S3 endpoint) fewsound itself reads with

    def paths(split: str) -> list[str]:
        return [storage.location(p)[1] for p in c.shard_paths(split)]

    train = ray.data.read_parquet(paths("train"), filesystem=fs, columns=columns, shuffle="files")
    return train, ray.data.read_parquet(paths("validation"), filesystem=fs, columns=columns)


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


# --------------------------------------------------------------------------------------------- workers


def _audio_matrix(batch: dict[str, Any]) -> np.ndarray:
    a = batch["audio"]
    return a.astype(np.float32) if a.dtype != object else np.stack([np.asarray(x, dtype=np.float32) for x in a])


def ray_batches(
    shard: Any,
    local_batch: int,
    length: int,
    *,
    seed: int,
    rank: int,
    start_epoch: int,
    cache: bool = False,
    augment: Any = None,
):
    """Endless stream of this worker's [local_batch, length] random crops from its Ray Data shard: pass after
    pass over the shard (each pass a new streaming-split epoch, locally shuffled), cropped at random.

    cache=True (the driver decides, for every worker alike, when a worker's share of the training split is small:
    CACHE_BYTES): the first pass is streamed and kept, later passes are random permutations of the kept rows.
    A pass over a small corpus (the built-in one: 33 segments) costs Ray Data seconds of scheduling for a few
    batches; a big corpus is always streamed. Every worker calls iter_batches the same number of times (once,
    or once per pass), as the streaming split requires. `augment`: fewsound.train.Augment for the crops.
    """
    from fewsound.train import crop_batch

    kept: list[np.ndarray] = []
    n_pass = 0
    while True:
        rng = np.random.default_rng([seed, rank, start_epoch, n_pass])
        got = 0
        if cache and n_pass > 0:
            rows = np.stack(kept)
            order = rng.permutation(len(rows))
            for i in range(0, len(order) - local_batch + 1, local_batch):
                got += 1
                yield crop_batch(rows[order[i : i + local_batch]], length, rng, augment)
        else:
            pending: list[np.ndarray] = []
            for batch in shard.iter_batches(
                batch_size=local_batch,
                batch_format="numpy",
                drop_last=False,
                local_shuffle_buffer_size=max(4 * local_batch, 32),
                local_shuffle_seed=int(rng.integers(2**31)),
            ):
                audio = _audio_matrix(batch)
                if cache:
                    kept.extend(audio)
                pending.extend(audio)
                while len(pending) >= local_batch:  # full batches only (drop_last), whatever the block sizes
                    got += 1
                    yield crop_batch(np.stack(pending[:local_batch]), length, rng, augment)
                    pending = pending[local_batch:]
        if got == 0:
            raise DataError(
                "train split",
                f"yields no full batch of {local_batch} clips per worker; use a smaller --batch-size or fewer workers",
            )
        n_pass += 1


def _my_validation(shard: Any, val_ids: list[str], val_kinds: list[str], rank: int, world: int, length: int):
    """This rank's validation clips (subset positions rank, rank + W, ...): (crops [v, length], ids, kinds)."""
    from fewsound.train import validation_crop

    mine = {cid: i for i, cid in enumerate(val_ids) if i % world == rank}
    found: dict[str, np.ndarray] = {}
    for batch in shard.iter_batches(batch_size=32, batch_format="numpy"):
        audio = _audio_matrix(batch)
        for cid, a in zip(batch["clip_id"], audio):
            if str(cid) in mine:
                found[str(cid)] = a
    order = sorted(found, key=mine.__getitem__)
    if len(found) != len(mine):
        raise DataError("validation split", f"rank {rank} found {len(found)} of its {len(mine)} validation clips")
    crops = validation_crop(np.stack([found[c] for c in order]), length) if order else np.zeros((0, length), np.float32)
    return crops, order, [val_kinds[mine[c]] for c in order]


def _log_audio(run: Any, epoch: int, rows: list[dict], sr: int) -> None:
    from fewsound.data.audio import save_audio
    from fewsound.report import save_spectrogram_png

    with tempfile.TemporaryDirectory() as d:
        for r in rows:
            stem = r["clip_id"].replace("/", "_").replace("@", "_at_")
            folder = Path(d) / f"epoch_{epoch + 1:05d}" / stem
            save_audio(folder / "gt.wav", r["ref"], sr)
            save_audio(folder / "pred.wav", r["rec"], sr)
            save_spectrogram_png(
                folder / "spectrogram.png",
                r["ref"],
                r["rec"],
                sr,
                title=f"{r['clip_id']} ({r['kind']}), epoch {epoch + 1}",
            )
            if r.get("uni") is not None:
                save_audio(folder / "universal.wav", r["uni"], sr)
        run.log_artifact(Path(d) / f"epoch_{epoch + 1:05d}", f"reconstructions/epoch_{epoch + 1:05d}")


def _log_curve(run: Any, key: str, values: list[float], first_step: int) -> None:
    """Rank 0's per-step losses of one epoch (its share of each batch), in one request."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    run.client.log_batch(run.run_id, metrics=[Metric(key, float(v), now, first_step + i) for i, v in enumerate(values)])


def _log_final_model(run: Any, model: Any, uri: str) -> None:
    import mlflow
    import mlflow.pytorch
    import torch

    from fewsound.hyper import save_model

    with tempfile.TemporaryDirectory() as d:
        run.log_artifact(save_model(Path(d) / MODEL_FILE, model), "model_file")
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run.run_id):
        # explicit requirements: inferring them would load the model in a subprocess (slow, and needs the GPU)
        mlflow.pytorch.log_model(
            model.cpu(),
            name="model",
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )


class Progress:
    """Rank 0's job-log lines: within an epoch at most every `every_s` seconds (step i/n, samples/s), and after
    every epoch; each with the ETA of the whole run from the wall time this session has spent per step since its
    first step (validation and checkpoints included, start-up not), so a resumed run's ETA counts only the steps
    still to do."""

    def __init__(self, cfg: Any, start_epoch: int, world: int, every_s: float = 30.0, clock: Any = time.perf_counter):
        self.cfg, self.world, self.every_s, self.clock = cfg, world, every_s, clock
        self.last = clock()
        self.t0: float | None = None  # when this session's first step ended
        self.first_step = start_epoch * cfg.steps_per_epoch + 1
        self.epoch = start_epoch

    def eta_seconds(self, global_step: int) -> float:
        done = global_step - self.first_step
        if self.t0 is None or done <= 0:
            return float("nan")
        return (self.clock() - self.t0) / done * (self.cfg.total_steps - global_step)

    def on_step(self, steps: int, samples: int, seconds: float) -> None:
        """run_epoch's callback: one line when `every_s` passed since the last one."""
        now = self.clock()
        if self.t0 is None:
            self.t0 = now
        if now - self.last < self.every_s or steps == self.cfg.steps_per_epoch:
            return
        self.last = now
        step = self.epoch * self.cfg.steps_per_epoch + steps
        rate = samples * self.world / max(seconds, 1e-9)
        _say(
            f"[train] epoch {self.epoch + 1}/{self.cfg.epochs} step {steps}/{self.cfg.steps_per_epoch} "
            f"({step}/{self.cfg.total_steps})  {rate:.1f} samples/s  ETA {_fmt_eta(self.eta_seconds(step))}"
        )

    def epoch_line(self, epoch: int, step: int, metrics: dict[str, float]) -> str:
        self.last = self.clock()
        self.epoch = epoch + 1
        eta = self.eta_seconds(step)
        metrics["progress/eta_seconds"] = eta if eta == eta else 0.0
        return (
            f"[train] epoch {epoch + 1}/{self.cfg.epochs} step {step}/{self.cfg.total_steps} "
            f"loss {metrics['train/loss']:.4f}"
            + (f" val {metrics['val/loss']:.4f}" if "val/loss" in metrics else "")
            + (f" universal {metrics['universal/loss']:.4f}" if "universal/loss" in metrics else "")
            + f"  {metrics['cost/samples_per_s']:.1f} samples/s  epoch {metrics['cost/epoch_seconds']:.1f} s"
            + f"  ETA {_fmt_eta(eta)}"
        )


def _say(line: str) -> None:
    """One job-log line from a worker. Ray Train patches `print` to both log and echo to a wrapped sys.stdout,
    which prints every line twice in the job log; the process's own stdout gets it once."""
    print(line, file=sys.__stdout__, flush=True)


def _fmt_eta(s: float) -> str:
    if s != s:  # NaN: nothing measured yet
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclasses.dataclass
class _Worker:
    """What one Ray Train worker holds for the whole run."""

    cfg: Any
    rank: int
    world: int
    device: Any
    model: Any  # the FewSound/HyperSound module (unwrapped)
    ddp: Any  # the same module behind DDP (or itself with one worker)
    optimizer: Any
    scheduler: Any
    run: Any  # MlflowRun on rank 0, NullLogger elsewhere
    start_epoch: int
    step: int


def _start_worker(config: dict[str, Any]) -> _Worker:
    """Build the model (same seed on every rank), restore the latest checkpoint if any, wrap it in DDP."""
    import ray.train
    import ray.train.torch
    import torch

    from fewsound.hyper import build_model
    from fewsound.tracking import MlflowRun, NullLogger
    from fewsound.train import load_training_state, make_optimizer, torch_threads, train_config_from_dict

    cpu_means_cpu()  # a CPU worker on a GPU node stays on the CPU (a GPU worker keeps the GPU Ray gave it)
    cfg = train_config_from_dict(config["train"])
    quiet_ray_data()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(torch_threads(config["cpus_per_worker"]))
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")  # fake GPUs
    model = build_model(cfg.model, verbose=False).to(device)  # it logs its description (once: print would repeat)
    optimizer, scheduler = make_optimizer(model, cfg)
    run = (
        MlflowRun(config["experiment"], uri=config["tracking_uri"], run_id=config["run_id"])
        if rank == 0
        else NullLogger()
    )
    start_epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta = load_training_state(d, model, optimizer, scheduler, device=device)
        start_epoch, step = meta["epoch"] + 1, meta["step"]
        assert meta["digest_loaded"] == meta["digest"], "restored state differs from the checkpoint's"
        if rank == 0:
            _say(f"[train] resumed after epoch {meta['epoch'] + 1} (step {step}); state digest {meta['digest_loaded']}")
            run.set_tags({RESUME_TAG: "true", f"fewsound.resume.epoch_{meta['epoch'] + 1}": meta["digest_loaded"]})
    elif rank == 0:
        run.log_metrics({"model/params": float(model.param_counts()["total"])}, step=0)
    ddp = ray.train.torch.prepare_model(model, move_to_device=False)
    return _Worker(cfg, rank, world, device, model, ddp, optimizer, scheduler, run, start_epoch, step)


def _train_metrics(w: _Worker, stats: Any, epoch: int) -> dict[str, float]:
    """The epoch's training metrics; the loss is the mean over ranks (each rank's over its equal share)."""
    import torch
    import torch.distributed as dist

    losses = torch.tensor(stats.losses, dtype=torch.float64, device=w.device)  # on the GPU for NCCL
    if w.world > 1:  # each rank's loss is the mean over its equal share: the global mean is the mean of means
        dist.all_reduce(losses)
        losses /= w.world
    return {
        "epoch": float(epoch),
        "train/loss": float(losses.mean()),
        "train/lr": stats.lr,
        "cost/samples_per_s": stats.samples * w.world / max(stats.seconds, 1e-9),
        "cost/epoch_seconds": stats.seconds,
        "progress/fraction": (epoch + 1) / w.cfg.epochs,
    }


def _validate_epoch(w: _Worker, epoch: int, val: tuple, log_ids: set[str]) -> tuple[dict[str, float], list[dict]]:
    """Validation on every rank's clips, gathered on rank 0: (summary metrics, audio rows to log); both empty on
    the other ranks. Audio (logged clips' reconstructions and FewSound's universal output) on audio epochs."""
    import torch.distributed as dist

    from fewsound.train import reconstruct, summarize_validation, universal_reconstruction, validate

    clips, ids, kinds = val
    length = w.cfg.model.clip_length
    rows = validate(w.model, clips, kinds, w.cfg, ids, device=w.device) if len(ids) else []
    audio_rows = []
    if w.cfg.is_audio_epoch(epoch):
        pick = [i for i, c in enumerate(ids) if c in log_ids]
        recs = reconstruct(w.model, clips[pick], device=w.device) if pick else []
        uni = universal_reconstruction(w.model, length)
        audio_rows = [
            {"clip_id": ids[i], "kind": kinds[i], "ref": clips[i], "rec": recs[j], "uni": uni}
            for j, i in enumerate(pick)
        ]
    gathered: list[Any] = [None] * w.world
    if w.world > 1:
        dist.all_gather_object(gathered, (rows, audio_rows))
    else:
        gathered = [(rows, audio_rows)]
    if w.rank != 0:
        return {}, []
    return summarize_validation([r for g in gathered for r in g[0]]), [a for g in gathered for a in g[1]]


def _report_epoch(w: _Worker, config: dict[str, Any], epoch: int, metrics: dict[str, float], losses: list) -> None:
    """Rank 0: the step curve and the epoch's metrics to MLflow, then the checkpoint to Ray Train."""
    import ray.train

    from fewsound.train import save_training_state

    _log_curve(w.run, "train/loss_step", losses, first_step=w.step - w.cfg.steps_per_epoch + 1)
    w.run.log_metrics(metrics, step=w.step)
    with tempfile.TemporaryDirectory() as d:
        meta = save_training_state(
            d,
            w.model,
            w.optimizer,
            w.scheduler,
            w.cfg,
            epoch=epoch,
            step=w.step,
            extra={"run_id": config["run_id"], "key": config["key"]},
        )
        ray.train.report(
            {**metrics, "digest": meta["digest"]},
            checkpoint=ray.train.Checkpoint.from_directory(d),
            checkpoint_dir_name=f"epoch_{epoch + 1:05d}",
        )


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (see the module docstring): per epoch, train, validate when due, report."""
    import ray.train

    from fewsound.train import run_epoch, unwrap

    w = _start_worker(config)
    cfg = w.cfg
    stream = ray_batches(
        ray.train.get_dataset_shard("train"),
        cfg.batch_size // w.world,
        cfg.model.clip_length,
        seed=cfg.seed,
        rank=w.rank,
        start_epoch=w.start_epoch,
        cache=config.get("cache_train", False),
        augment=cfg.augment,
    )
    progress = Progress(cfg, w.start_epoch, w.world) if w.rank == 0 else None
    val_cache = None
    log_ids = set(config["log_ids"])
    for epoch in range(w.start_epoch, cfg.epochs):
        stats = run_epoch(
            w.ddp,
            stream,
            w.optimizer,
            w.scheduler,
            cfg,
            epoch,
            device=w.device,
            on_step=progress.on_step if progress else None,
        )
        w.step += cfg.steps_per_epoch
        metrics = _train_metrics(w, stats, epoch)
        if cfg.is_val_epoch(epoch):
            if val_cache is None:
                val_cache = _my_validation(
                    ray.train.get_dataset_shard("validation"),
                    config["val_ids"],
                    config["val_kinds"],
                    w.rank,
                    w.world,
                    cfg.model.clip_length,
                )
            summary, audio = _validate_epoch(w, epoch, val_cache, log_ids)
            metrics.update(summary)
            if audio:
                _log_audio(w.run, epoch, audio, cfg.model.sample_rate)
        if w.rank == 0:
            line = progress.epoch_line(epoch, w.step, metrics)
            _report_epoch(w, config, epoch, metrics, stats.losses)
            _say(line)
        else:
            ray.train.report(metrics)
    if w.rank == 0:
        _log_final_model(w.run, unwrap(w.model), config["tracking_uri"])


# --------------------------------------------------------------------------------------------- evaluation


def is_run_id(source: str) -> bool:
    """Whether `source` reads as an MLflow run id (32 hex digits) rather than a path."""
    import re

    return re.fullmatch(r"[0-9a-f]{32}", source) is not None and not Path(source).exists()


def load_trained(source: str, *, tracking: str | None = None):
    """A trained model from: a fewsound model file (save_model), a training checkpoint folder, a run's storage
    folder (its latest epoch_* checkpoint), or an MLflow run id (its model_file artifact)."""
    from fewsound.hyper import load_model
    from fewsound.train import STATE_FILE, model_from_training_state

    p = Path(source).expanduser()
    if p.is_file():
        return load_model(p)
    if p.is_dir():
        if (p / STATE_FILE).exists():
            return model_from_training_state(p)
        epochs = sorted(q for q in p.glob("epoch_*") if (q / STATE_FILE).exists())
        if epochs:
            return model_from_training_state(epochs[-1])
        raise ConfigError(source, "folder holds no training checkpoint (train_state.pt) nor epoch_* checkpoints")
    if is_run_id(source):
        import mlflow.artifacts

        from fewsound.tracking import tracking_uri

        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=source, artifact_path=f"model_file/{MODEL_FILE}", tracking_uri=tracking or tracking_uri()
            )
        except Exception as e:  # noqa: BLE001 - an unknown run or a run without the artifact is the user's input
            raise ConfigError(source, f"MLflow run has no model_file/{MODEL_FILE} ({type(e).__name__})") from None
        return load_model(local)
    raise ConfigError(source, "not a model file, a checkpoint folder, nor an MLflow run id")
