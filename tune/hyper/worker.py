"""Workers (`train_loop_per_worker`): build the model from the config (same seed on every rank), restore the latest
checkpoint if any, wrap in DDP (`prepare_model`), then per epoch: `fewsound.train.run_epoch`, the mean loss
over ranks, validation every `val_every` epochs (metrics per rank, gathered on rank 0), and
`ray.train.report` with a checkpoint written by rank 0 (state + meta.json with the state digest). Rank 0 alone
talks to MLflow: curves, validation metrics, audio and spectrograms of the logged clips, and at the end the
model (fewsound's own file and an MLflow PyTorch model in the pickle-free "pt2" format). Rank 0 also writes the
job log's progress: a line at most every 30 s within an epoch and one per epoch, with samples/s and the ETA of the
whole run (`Progress`).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fewsound.hyper.trained import MODEL_FILE
from tune.hyper.data import quiet_ray_data, ray_batches, validation_clips
from tune.ray_env import cpu_means_cpu
from tune.spine import (
    RESUME_EPOCH_PREFIX,
    RESUMED_TAG,
    fmt_duration,
)


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


def _log_final_model(run: Any, model: Any, uri: str, clips: Any = None) -> None:
    """The trained model twice: fewsound's own file (weights-only, `model_file/`) and an MLflow PyTorch model in
    MLflow's "pt2" format (torch.export's graph and weights: `mlflow.pytorch.load_model` loads it without
    unpickling any code, as MLflow requires by default). `clips` [V, N]: example input (two of them; seeded noise
    when fewer), traced with a dynamic batch size."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from fewsound.hyper import save_model

    with tempfile.TemporaryDirectory() as d:
        run.log_artifact(save_model(Path(d) / MODEL_FILE, model), "model_file")
    model = model.cpu().eval()
    n = model.config.clip_length
    if clips is None or len(clips) < 2:  # a batch of 1 would be traced as a fixed batch size
        clips = np.random.default_rng(0).standard_normal((2, n)) * 0.1
    example = np.ascontiguousarray(clips[:2], dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run.run_id):
        # explicit requirements: inferring them would load the model in a subprocess (slow, and needs the GPU)
        mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pt2",
            input_example=example,
            signature=infer_signature(example, output),
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
            f"({step}/{self.cfg.total_steps})  {rate:.1f} samples/s  ETA {fmt_duration(self.eta_seconds(step))}"
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
            + f"  ETA {fmt_duration(eta)}"
        )


def _say(line: str) -> None:
    """One job-log line from a worker. Ray Train patches `print` to both log and echo to a wrapped sys.stdout,
    which prints every line twice in the job log; the process's own stdout gets it once."""
    print(line, file=sys.__stdout__, flush=True)


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
    metric_workers: int = 0  # processes for the CPU-only validation metrics (PESQ, STOI): the worker's CPUs


def _start_worker(config: dict[str, Any]) -> _Worker:
    """Build the model (same seed on every rank), restore the latest checkpoint if any, wrap it in DDP."""
    import ray.train
    import ray.train.torch
    import torch

    from fewsound.device import resolve_device
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
    device = resolve_device(device)  # fewsound's numerics: the encoders' convolutions without TF32 (set_numerics)
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
            meta = load_training_state(d, model, optimizer, scheduler)
        start_epoch, step = meta["epoch"] + 1, meta["step"]
        assert meta["digest_loaded"] == meta["digest"], "restored state differs from the checkpoint's"
        if rank == 0:
            _say(f"[train] resumed after epoch {meta['epoch'] + 1} (step {step}); state digest {meta['digest_loaded']}")
            run.set_tags({RESUMED_TAG: "true", f"{RESUME_EPOCH_PREFIX}{meta['epoch'] + 1}": meta["digest_loaded"]})
    elif rank == 0:
        run.log_metrics({"model/params": float(model.param_counts()["total"])}, step=0)
    ddp = ray.train.torch.prepare_model(model, move_to_device=False)
    metric_workers = int(config["cpus_per_worker"] or 0)
    return _Worker(cfg, rank, world, device, model, ddp, optimizer, scheduler, run, start_epoch, step, metric_workers)


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
    the other ranks. Reconstructions and loss on the worker's device, PESQ/STOI in a pool of the worker's CPUs.
    Audio (logged clips' reconstructions and FewSound's universal output) on audio epochs."""
    import torch.distributed as dist

    from fewsound.train import reconstruct, summarize_validation, universal_reconstruction, validate

    clips, ids, kinds = val
    length = w.cfg.model.clip_length
    rows = validate(w.model, clips, kinds, w.cfg, ids, device=w.device, workers=w.metric_workers) if len(ids) else []
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
                val_cache = validation_clips(
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
        _log_final_model(w.run, unwrap(w.model), config["tracking_uri"], val_cache[0] if val_cache else None)
