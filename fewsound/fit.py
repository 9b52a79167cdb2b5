"""Fitting INRs to audio clips: one clip, or B clips packed into one batched fit.

    results = fit(FitConfig(family="kan", steps=2000), clips)      # clips: [B, N] -> B FitResults

A packed fit trains B independent networks at once: every parameter tensor has a leading axis B (the batched
functional INRs of fewsound.inr), the loss is the *sum* of per-clip losses, and Adam/AdamW update each element
from its own gradient and moments. So clip b's trajectory depends only on its target and seed, exactly as in a
fit of that clip alone (tests/test_fit.py checks packed == separate); nothing here may mix clips (no global
gradient-norm clipping, no loss mean over the pack).

Each step: forward all B networks, per-clip loss [B], then per clip (the forward/backward runs in chunks of clips,
`auto_clips_per_chunk`, accumulating each chunk's gradients before the one optimizer step of the pack: on the CPU
because a whole pack's activations spill out of the caches and made packed fits dearer per clip than single fits;
on CUDA as many clips as the process's share of the GPU holds (fewsound.device), and a chunk that still runs out
of memory is redone in halves):
- a non-finite loss (divergence, e.g. SIREN at too high a rate) freezes that clip: its parameters go back to the
  last weights whose loss was finite and stay there (gradients zeroed, optimizer drift undone), and the step is
  recorded; the other clips go on. All of this is tensor ops on the device, with no host sync per step.
- the running best loss is tracked.
On the CPU, a pack's chunks run on worker threads (`_clip_workers`): one clip per core beats every core on one
clip; a single clip's samples are split over the threads instead (its INR forward and backward per segment).
`precision="bf16"` runs the INR forward under bfloat16 autocast; `compile` puts the INR forward through
torch.compile ("reduce-overhead": CUDA graphs on a GPU), falling back to eager with one line if that fails.
Every `checkpoint_every` steps the full state (params, optimizer moments, divergence masks, best losses) is
written atomically to `checkpoint_dir/fit.pt`; a later call with the same config, seeds and clips resumes from
it and ends bit-identical to an uninterrupted fit on the same device (same ops in the same order, no RNG after
init).

Learning rates (FitConfig.lr=None picks the family default, DEFAULT_LR): the paper gives only KAN's, 5e-3 (its
ablation base; the paper shows KAN stable from 1e-3 to 1e-2). The others are our choice: NeRF/RFF 1e-3 (the usual
rate of ReLU MLPs with Fourier features), SIREN/FINER 1e-4 (SIREN's audio experiments; sine nets collapse at high
rates, as the paper notes), WIRE 1e-3; each learns real speech at its rate (tests/test_fit.py checks it). The
Optuna search tunes them.
Optimizer: AdamW (the paper's text; torch's default weight decay 0.01) by default; "adam" (the paper's code:
Adam, constant rate, no weight decay) selectable. The rate is constant, as in the paper's code.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from fewsound.config import cfg_hash, to_dict
from fewsound.device import cuda_clips_per_chunk, release_cached_memory, resolve_device, split_on_oom
from fewsound.errors import AudioError, ConfigError
from fewsound.losses import RESOLUTIONS, ReconstructionLoss
from fewsound.safe_load import load_weights_only

# Per-family default learning rate (constant). KAN: the paper's ablation base. Others: our sweep, see docstring.
DEFAULT_LR: dict[str, float] = {
    "kan": 5e-3,
    "nerf": 1e-3,
    "siren": 1e-4,
    "finer": 1e-4,
    "wire": 1e-3,
    "rff": 1e-3,
}

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
OPTIMIZERS: dict[str, type[torch.optim.AdamW] | type[torch.optim.Adam]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
}
# AdamW: torch's default decoupled decay (the paper's hypernetwork runs use it too). Adam: the paper's INR code.
DEFAULT_WEIGHT_DECAY: dict[str, float] = {"adamw": 0.01, "adam": 0.0}

# Fields that change how a fit runs but not what it computes: left out of the fit's key hash.
RUNTIME_FIELDS = ("checkpoint_every", "log_every", "device", "compile")
# INR forward precision. "bf16": the forward runs under torch.autocast(bfloat16) - matmuls (and the KAN layer's
# two products) take bfloat16 operands and accumulate in float32; activations, the loss and AdamW stay in `dtype`.
# SIREN, FINER and WIRE opt out (INR.autocast_safe): their forward stays float32 under autocast, so "bf16" changes
# nothing for them (fewsound.inr.base says why).
PRECISIONS: dict[str, torch.dtype | None] = {"full": None, "bf16": torch.bfloat16}
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CHECKPOINT_NAME = "fit.pt"
MIN_SAMPLES = max(n_fft for n_fft, _, _ in RESOLUTIONS) // 2 + 1  # a centred, reflect-padded 2048-point STFT


@dataclass(frozen=True)
class FitConfig:
    """Everything that determines a fit (with the clip and the seed). Defaults: the paper's Table 1 protocol."""

    family: str = "kan"
    inr: dict[str, Any] = field(default_factory=dict)  # overrides of the family's INR config fields
    steps: int = 10_000
    lr: float | None = None  # None: DEFAULT_LR[family]
    optimizer: str = "adamw"
    weight_decay: float | None = None  # None: DEFAULT_WEIGHT_DECAY[optimizer]
    betas: tuple[float, float] = (0.9, 0.999)
    lambda_t: float = 1.0
    lambda_f: float = 1.0
    sample_rate: int = 22_050  # the rate the mel filterbanks of the loss are built for
    seed: int = 0
    checkpoint_every: int = 0  # 0: no checkpoints
    log_every: int = 100
    device: str = "auto"  # "auto": CUDA when present, else CPU
    dtype: str = "float32"  # "float64" for numerical checks (e.g. packed == separate for SIREN, see tests)
    precision: str = "full"  # "bf16": the INR forward under bfloat16 autocast (float32 accumulation, see PRECISIONS)
    compile: str = "off"  # torch.compile mode of the INR forward: "default", "reduce-overhead" (CUDA graphs), ...

    def __post_init__(self) -> None:
        from fewsound.inr import FAMILIES

        if self.family not in FAMILIES:
            raise ConfigError("family", f"unknown INR family {self.family!r}; valid: {sorted(FAMILIES)}")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError("compile", f"must be one of {list(COMPILE_MODES)}, got {self.compile!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("optimizer", f"unknown optimizer {self.optimizer!r}; valid: {sorted(OPTIMIZERS)}")
        for name in ("steps", "checkpoint_every", "log_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(name, f"must be a non-negative integer, got {value!r}")
        if self.log_every == 0:
            raise ConfigError("log_every", "must be >= 1")
        if self.lr is not None and not (self.lr > 0 and np.isfinite(self.lr)):
            raise ConfigError("lr", f"must be a positive finite number, got {self.lr!r}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        if self.lambda_t < 0 or self.lambda_f < 0 or self.lambda_t + self.lambda_f == 0:
            raise ConfigError(
                "lambda_t/lambda_f", f"need both >= 0 and not both 0, got {self.lambda_t}, {self.lambda_f}"
            )
        # lists (from JSON / flattened MLflow params) -> tuples, so equal configs compare and hash equal
        object.__setattr__(self, "inr", {k: tuple(v) if isinstance(v, list) else v for k, v in dict(self.inr).items()})
        object.__setattr__(self, "betas", tuple(self.betas))
        from fewsound.inr import family_config

        family_config(self.family, **self.inr)  # ConfigError naming a bad INR key, now rather than mid-sweep

    @property
    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.family]

    @property
    def resolved_weight_decay(self) -> float:
        return float(self.weight_decay) if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.optimizer]

    def key_hash(self, n: int = 8) -> str:
        """Hash of what determines the result (runtime fields excluded): the `cfg_hash8` of a fit's key."""
        d = to_dict(self)
        for name in RUNTIME_FIELDS:
            d.pop(name)
        d["lr"], d["weight_decay"] = self.resolved_lr, self.resolved_weight_decay
        if d["precision"] == "full":  # left out at its default: the keys of fits from before the field stay valid
            d.pop("precision")
        return cfg_hash(d, n)

    def build_inr(self):
        from fewsound.inr import build_inr

        return build_inr(self.family, **self.inr)


class MetricLogger(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...


class _NoLogger:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass


@dataclass
class FitResult:
    """The outcome of one clip's fit. `params`/`buffers`: that clip's tensors (CPU, no batch axis)."""

    reconstruction: np.ndarray  # float32 [N], from the final (or, if diverged, last good) weights
    loss: float  # loss of `reconstruction`
    best_loss: float  # lowest loss seen during the fit (at some step <= steps)
    best_step: int
    steps: int  # optimizer updates in the returned weights (diverged at step d: d - 1, its last finite-loss weights)
    steps_per_s: float  # fit steps per second of this call (a packed fit advances every clip at this rate)
    seconds: float  # wall seconds of this call (init, loop and final evaluation)
    num_params: int
    diverged: bool
    diverged_step: int | None  # the first step whose loss (or weights) was non-finite
    seed: int
    family: str
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    history: list[tuple[int, float]]  # (step, loss) every log_every steps

    def metrics(self) -> dict[str, float]:
        """The metric keys (shared by every job's runs) this fit provides."""
        return {
            "fit/loss": self.loss,
            "cost/seconds": self.seconds,
            "cost/steps_per_s": self.steps_per_s,
            "model/params": float(self.num_params),
        }


# On the CPU a pack's forward/backward runs in chunks of about this many samples (clips * N): one 1.5 s clip.
# The activations of a whole pack ([B, N, 90] per layer, kept for backward) fall out of the caches, which made
# the per-clip step of a B = 8 pack dearer than a single fit's; chunking keeps what is cheap about packing
# (one batched optimizer step, fewer Python/op round trips for short clips) without that cost.
CPU_CHUNK_SAMPLES = 32_768


def auto_clips_per_chunk(
    device: torch.device, n_clips: int, n_samples: int, *, custom_loss: bool = False, family: str | None = None
) -> int:
    """Clips per forward/backward chunk. With a custom loss_fn: the whole pack (it sees the whole pack). On the
    CPU: max(1, CPU_CHUNK_SAMPLES // N). On CUDA: as many clips as this process's share of the GPU holds
    (fewsound.device.cuda_clips_per_chunk, from the device's free memory and `family`'s bytes per clip-sample;
    one launch sequence for many clips is what makes a GPU fast), the whole pack when `family` is None."""
    if custom_loss:
        return n_clips
    if device.type == "cuda" and family is not None:
        return cuda_clips_per_chunk(device, family, n_samples, n_clips)
    if device.type != "cpu":
        return n_clips
    return max(1, min(n_clips, CPU_CHUNK_SAMPLES // n_samples))


def as_clip_batch(clips: Any) -> torch.Tensor:
    """[N] / [B, N] tensor or array, or a list of equal-length [N] arrays -> float32 CPU tensor [B, N]."""
    if isinstance(clips, (list, tuple)):
        if not clips:
            raise AudioError("clips", "no clips to fit")
        lengths = {int(np.shape(c)[-1]) for c in clips}
        if len(lengths) != 1 or any(np.ndim(c) != 1 for c in clips):
            raise AudioError("clips", f"a packed fit needs equal-length 1-D clips, got lengths {sorted(lengths)}")
        x = torch.stack([torch.as_tensor(np.asarray(c, dtype=np.float32)) for c in clips])
    else:
        x = torch.as_tensor(clips).detach().to("cpu", torch.float32)
        if x.dim() == 1:
            x = x[None]
    if x.dim() != 2 or x.shape[0] == 0:
        raise AudioError("clips", f"expected [B, N] clips, got shape {tuple(x.shape)}")
    if x.shape[1] < MIN_SAMPLES:
        raise AudioError("clips", f"too short: {x.shape[1]} samples, the loss needs at least {MIN_SAMPLES}")
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        raise AudioError(f"clip {int(bad.nonzero()[0])}", "contains NaN/Inf samples")
    return x.contiguous()


def fit(
    config: FitConfig,
    clips: Any,
    *,
    seeds: Sequence[int] | None = None,
    logger: MetricLogger | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    clips_per_chunk: int | None = None,
) -> list[FitResult]:
    """Fit one INR per clip, all B at once. Returns one FitResult per clip, in order.

    clips: [B, N] (tensor/array) or a list of B equal-length [N] arrays; one [N] clip is B = 1.
    seeds: one init seed per clip; default `config.seed` for every clip, so a clip's result does not depend on
        which pack it was fitted in.
    checkpoint_dir: where `fit.pt` is written every `config.checkpoint_every` steps and at the end; with
        `resume`, an existing checkpoint of the same fit (config, seeds, clips) is continued.
    loss_fn: `(pred [B, N], target [B, N]) -> [B]` replacing the paper's loss (e.g. to inject faults in tests, or
        to watch the predictions, as tune/search/trial.py does). It is called once per step with the whole pack,
        unless `clips_per_chunk` is given, in which case it is called per chunk with that chunk's clips.
    clips_per_chunk: clips whose forward/backward run together (gradients of the chunks are accumulated, then one
        optimizer step updates the whole pack). None: automatic (`auto_clips_per_chunk`: on CUDA what the
        process's share of the GPU holds; on the CPU, chunks of about CPU_CHUNK_SAMPLES samples with the paper's
        loss; the whole pack with a custom `loss_fn`). Results do not depend on it beyond float rounding.
        A step whose forward/backward runs out of memory (torch.OutOfMemoryError) is run again with chunks of
        half the size, down to one clip (fewsound.device.split_on_oom); the fit goes on at the smaller size.
    """
    t_start = time.perf_counter()
    logger = logger or _NoLogger()
    target_cpu = as_clip_batch(clips)
    n_clips, n_samples = target_cpu.shape
    seeds = [config.seed] * n_clips if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n_clips:
        raise ConfigError("seeds", f"{len(seeds)} seeds for {n_clips} clips")
    device = resolve_device(config.device)
    dtype = DTYPES[config.dtype]
    inr = config.build_inr()
    params, buffers = inr.init(seeds, device=device, dtype=dtype)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    for p in params.values():
        p.grad = torch.zeros_like(p)  # allocated once: chunks write their slices of it
    optimizer = OPTIMIZERS[config.optimizer](
        list(params.values()), lr=config.resolved_lr, betas=config.betas, weight_decay=config.resolved_weight_decay
    )
    chunk = _chunk_size(clips_per_chunk, device, n_clips, n_samples, config.family, custom_loss=loss_fn is not None)
    chunks = _Chunks(config, inr, params, buffers, target_cpu.to(device, dtype), chunk, loss_fn)
    pack = _PackState(params, n_clips, device, dtype)

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    identity = {"key": config.key_hash(), "family": config.family, "seeds": seeds, "clips_sha": _sha(target_cpu)}
    start_step = 0
    if ckpt_path is not None and resume and ckpt_path.exists():
        start_step, pack.history = _load_checkpoint(
            ckpt_path, identity, params, pack.good, pack.state, optimizer, device
        )

    # chunks in parallel threads only with the paper's loss (user code need not be thread-safe) and eager (dynamo's
    # compilation is not thread-safe)
    parallel_ok = loss_fn is None and config.compile == "off"
    with _flush_denormals(device), _clip_workers(device, chunks, parallel_ok) as pool:
        t_loop = time.perf_counter()
        for step in range(start_step, config.steps):
            run = functools.partial(_step_in_chunks, step, chunks, pack, optimizer, pool)
            per_clip, _ = split_on_oom(run, chunks.size)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                logger.log_metrics(pack.log(step, per_clip), step)
            if ckpt_path is not None and config.checkpoint_every and (done % config.checkpoint_every == 0):
                _save_checkpoint(ckpt_path, identity, done, params, pack, optimizer)
        loop_seconds = time.perf_counter() - t_loop
        steps_run = max(config.steps - start_step, 0)
        saved_at_end = config.checkpoint_every and config.steps % config.checkpoint_every == 0
        if ckpt_path is not None and steps_run and not saved_at_end:
            _save_checkpoint(ckpt_path, identity, config.steps, params, pack, optimizer)
        # the weights we return (for a diverged clip: its last good weights)
        (final, pred), _ = split_on_oom(lambda c: chunks.resplit(c).evaluate(), chunks.size)
    steps_per_s = steps_run / loop_seconds if steps_run and loop_seconds > 0 else float("nan")
    timing = {"steps_per_s": steps_per_s, "seconds": time.perf_counter() - t_start}
    return _results(config, inr, seeds, params, buffers, pack, final, pred, timing)


def _chunk_size(
    clips_per_chunk: int | None, device: torch.device, n_clips: int, n_samples: int, family: str, custom_loss: bool
) -> int:
    """`clips_per_chunk`, checked, or the automatic size (auto_clips_per_chunk)."""
    chunk = clips_per_chunk or auto_clips_per_chunk(device, n_clips, n_samples, custom_loss=custom_loss, family=family)
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ConfigError("clips_per_chunk", f"must be a positive integer, got {clips_per_chunk!r}")
    return chunk


class _Chunks:
    """The pack's forward/backward units: clip spans [a, b), their buffers and their loss.

    A pack of B clips runs as one chunk (the pack's own parameter tensors) or as several, each on leaf slices of
    the pack's tensors whose gradients are copied back into the pack's `.grad` before the one optimizer step.
    """

    def __init__(self, config: FitConfig, inr, params, buffers, target, chunk: int, loss_fn):
        n_clips, n_samples = target.shape
        self.inr, self.params, self.target, self.loss_fn = inr, params, target, loss_fn
        self.config, self.all_buffers = config, buffers
        self.forward = _InrForward(inr, config, target.device)
        self.t = _coordinates(n_samples, target.device, target.dtype)
        self.segments: list[tuple[int, int]] = []  # sample ranges [a, b) of a split chunk (see _clip_workers)
        self.size = 0
        self.resplit(chunk)

    def resplit(self, chunk: int) -> _Chunks:
        """Chunks of `chunk` clips from now on (after an out-of-memory error: smaller ones). Returns self."""
        if chunk == self.size:
            return self
        n_clips, config, target = self.target.shape[0], self.config, self.target
        if self.size:
            release_cached_memory()  # the old chunks' loss features
        self.size = chunk
        self.spans = [(a, min(a + chunk, n_clips)) for a in range(0, n_clips, chunk)]
        self.buffers = [{k: v[a:b] for k, v in self.all_buffers.items()} for a, b in self.spans]
        self.segments = self.segments if len(self.spans) == 1 else []
        self.paper = None
        if self.loss_fn is None:  # the paper's loss, with each chunk's target features computed once
            self.paper = [
                ReconstructionLoss(
                    target[a:b], lambda_t=config.lambda_t, lambda_f=config.lambda_f, sr=config.sample_rate
                )
                for a, b in self.spans
            ]
        return self

    def predict(self, i: int, grad: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Chunk i's params (leaf slices of the pack's tensors when the pack is split) and predictions [b - a, N]."""
        a, b = self.spans[i]
        if len(self.spans) == 1:
            sub = self.params
        else:
            sub = {k: v[a:b].detach().requires_grad_(grad) for k, v in self.params.items()}
        forward = self.forward if grad else self.forward.eager  # evaluation: no second compile for no_grad
        return sub, forward(sub, self.t, self.buffers[i])

    def predict_segments(self, pool: ThreadPoolExecutor) -> list[torch.Tensor]:
        """The single chunk's predictions per sample segment ([B, segment length] each, with autograd through the
        pack's own parameter tensors), segment j computed on a worker thread of `pool`."""
        assert len(self.spans) == 1, "only a pack of one chunk is split into sample segments"
        return list(
            pool.map(lambda seg: self.forward(self.params, self.t[slice(*seg)], self.buffers[0]), self.segments)
        )

    def loss(self, i: int, pred: torch.Tensor) -> torch.Tensor:
        """Chunk i's per-clip loss [b - a]."""
        if self.paper is not None:
            return self.paper[i](pred)
        a, b = self.spans[i]
        return self.loss_fn(pred, self.target[a:b])

    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss [B] and predictions [B, N] of the current weights, on the CPU (no autograd)."""
        with torch.no_grad():
            preds, losses = [], []
            for i in range(len(self.spans)):
                _, pred = self.predict(i, grad=False)
                losses.append(self.loss(i, pred).cpu())
                preds.append(pred.cpu())
        return torch.cat(losses), torch.cat(preds)


_COMPILED: dict[tuple, Callable] = {}


class _InrForward:
    """inr(params, t, buffers) -> [B, N] in t's dtype: under autocast for a reduced `precision`, and through
    torch.compile for a `compile` mode other than "off". If compiling (or running the compiled code, forward or
    backward) fails, one line says so on stderr and the fit goes on eagerly (`fall_back`)."""

    def __init__(self, inr, config: FitConfig, device: torch.device):
        self.inr, self.autocast, self.device_type = inr, PRECISIONS[config.precision], device.type
        self.compiled: Callable | None = None
        # one compiled forward per INR config, precision, mode and device, shared by later fits in this process:
        # a new torch.compile per fit would compile again each time (and hit dynamo's recompile limit in a sweep)
        self.key = (config.family, repr(sorted(config.inr.items())), config.precision, config.compile, device.type)
        if config.compile != "off":
            if self.key not in _COMPILED:
                _COMPILED[self.key] = torch.compile(
                    self.eager, mode=None if config.compile == "default" else config.compile
                )
            self.compiled = _COMPILED[self.key]

    def eager(self, params: dict[str, torch.Tensor], t: torch.Tensor, buffers: dict[str, torch.Tensor]):
        if self.autocast is None:
            return self.inr(params, t, buffers)
        with torch.autocast(self.device_type, dtype=self.autocast):
            pred = self.inr(params, t, buffers)
        return pred.to(t.dtype)

    def __call__(self, params: dict[str, torch.Tensor], t: torch.Tensor, buffers: dict[str, torch.Tensor]):
        return (self.compiled or self.eager)(params, t, buffers)

    def fall_back(self, error: Exception) -> bool:
        """After `error` in a compiled step: print one line and go eager (True), or False if not compiled."""
        if self.compiled is None:
            return False
        self.compiled = None
        _COMPILED.pop(self.key, None)
        root = error
        while root.__cause__ is not None:  # dynamo wraps the backend's own error: name that one
            root = root.__cause__  # type: ignore[assignment]
        first = " ".join(line.strip() for line in str(root).strip().splitlines()[:2])[:240]  # "backend X raised: E"
        print(f"warning: torch.compile failed ({type(root).__name__}: {first}); running eagerly", file=sys.stderr)
        return True


class _PackState:
    """Per-clip state of a pack, all on the device (no host sync per step): which clips are live, where each
    diverged, its best loss, and its last weights whose loss was finite (`good`, the rollback target)."""

    def __init__(self, params: dict[str, torch.Tensor], n_clips: int, device: torch.device, dtype: torch.dtype):
        self.state = {
            "active": torch.ones(n_clips, dtype=torch.bool, device=device),
            "diverged_at": torch.full((n_clips,), -1, dtype=torch.long, device=device),
            "best": torch.full((n_clips,), float("inf"), device=device, dtype=dtype),
            "best_step": torch.zeros(n_clips, dtype=torch.long, device=device),
        }
        self.good = {k: v.detach().clone() for k, v in params.items()}
        self.history: list[list[tuple[int, float]]] = [[] for _ in range(n_clips)]

    def observe(self, a: int, b: int, step: int, loss: torch.Tensor, sub: dict[str, torch.Tensor]) -> torch.Tensor:
        """Clips a..b-1 with a non-finite loss (or weights) at `step` stop here; returns the live mask [b - a]."""
        state = self.state
        with torch.no_grad():
            # a non-finite weight can hide behind a finite output (e.g. under a Gabor envelope that is 0)
            finite = torch.isfinite(loss)
            for p in sub.values():
                finite = finite & torch.isfinite(p).flatten(1).all(dim=1)
            was_active = state["active"][a:b]
            state["diverged_at"][a:b] = torch.where(was_active & ~finite, step, state["diverged_at"][a:b])
            live = was_active & finite
            state["active"][a:b] = live
        return live

    def update(self, step: int, per_clip: torch.Tensor, params: dict[str, torch.Tensor], optimizer) -> None:
        """Track the best losses, roll just-diverged clips back to their good weights, and take the optimizer step
        for the live clips only (a frozen clip's weights, and so its moments' effect, are restored after it)."""
        state, good = self.state, self.good
        active = state["active"]
        with torch.no_grad():
            improved = active & (per_clip < state["best"])
            state["best"] = torch.where(improved, per_clip, state["best"])
            state["best_step"] = torch.where(improved, step, state["best_step"])
            for k, p in params.items():
                m = _per_clip(active, p)
                p.copy_(torch.where(m, p, good[k]))  # a clip that just diverged goes back to its last good weights
                good[k].copy_(p)
                # a frozen clip's gradient may be NaN (0 * inf upstream); it must not reach its moments
                p.grad.masked_fill_(~m, 0)  # type: ignore[union-attr]  # allocated before the first step
            optimizer.step()
            for k, p in params.items():
                p.copy_(torch.where(_per_clip(active, p), p, good[k]))  # undo weight decay / momentum on frozen clips

    def log(self, step: int, per_clip: torch.Tensor) -> dict[str, float]:
        """Append the finite losses of `step` to the history; the metrics record (a host sync: log steps only)."""
        losses = per_clip.detach().cpu().tolist()
        for b, value in enumerate(losses):
            if value == value and abs(value) != float("inf"):
                self.history[b].append((step, value))
        return _log_record(losses, self.state["active"].cpu().tolist())


def _per_clip(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """mask [B] viewed to broadcast over `like` [B, ...]."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _step_in_chunks(step: int, chunks: _Chunks, pack: _PackState, optimizer, pool, chunk: int) -> torch.Tensor:
    """_step with the pack in chunks of `chunk` clips (split_on_oom's attempt at that size)."""
    return _step(step, chunks.resplit(chunk), pack, optimizer, pool)


def _step(step: int, chunks: _Chunks, pack: _PackState, optimizer, pool: ThreadPoolExecutor | None) -> torch.Tensor:
    """One optimizer step of the whole pack: forward/backward chunk by chunk (on `pool`'s threads, if any), then
    the masked update. Returns the per-clip loss [B] of the weights before the step (detached, on the device)."""
    params = chunks.params
    optimizer.zero_grad(set_to_none=False)
    per_clip = torch.empty(len(pack.history), device=chunks.target.device, dtype=chunks.target.dtype)

    def run(i: int) -> None:
        try:
            run_chunk(i)
        except torch.OutOfMemoryError:  # not the compiler's fault: the step is redone in smaller chunks
            raise
        except Exception as e:  # a failed torch.compile: the chunk again, eagerly (and the rest of the fit)
            if not chunks.forward.fall_back(e):
                raise
            a, b = chunks.spans[i]
            for p in params.values():
                p.grad[a:b].zero_()  # allocated before the first step
            run_chunk(i)

    def run_chunk(i: int) -> None:  # chunk i writes only its clips' slices of per_clip, .grad and the pack state
        a, b = chunks.spans[i]
        sub, pred = chunks.predict(i, grad=True)  # pred: [b - a, N]
        loss = chunks.loss(i, pred)  # [b - a]
        assert loss.shape == (b - a,), tuple(loss.shape)
        live = pack.observe(a, b, step, loss, sub)
        torch.where(live, loss, torch.zeros_like(loss)).sum().backward()
        if sub is not params:
            for k, p in params.items():
                p.grad[a:b].copy_(sub[k].grad)
        per_clip[a:b] = loss.detach()

    def run_split(workers: ThreadPoolExecutor) -> None:
        # the pack's one chunk; the INR is pointwise in t: segment j's forward and backward run on a worker, the
        # loss on the whole prediction in between (on this thread, at its intra-op threads); the segments'
        # gradients are summed in segment order, so the result does not depend on which worker ran which segment
        preds = chunks.predict_segments(workers)
        pred = torch.cat([p.detach() for p in preds], dim=-1).requires_grad_(True)
        loss = chunks.loss(0, pred)
        live = pack.observe(0, len(per_clip), step, loss, params)
        torch.where(live, loss, torch.zeros_like(loss)).sum().backward()
        d_pred, keys = pred.grad, list(params)
        assert d_pred is not None

        def backward(j: int) -> tuple[torch.Tensor | None, ...]:
            seg = slice(*chunks.segments[j])
            return torch.autograd.grad(preds[j], [params[k] for k in keys], d_pred[:, seg], allow_unused=True)

        per_segment = list(workers.map(backward, range(len(preds))))
        for n, k in enumerate(keys):
            total: torch.Tensor | None = None
            for g in per_segment:
                part = g[n]
                if part is not None:
                    total = part if total is None else total + part
            if total is not None:
                params[k].grad.copy_(total)  # .grad: allocated before the first step
        per_clip.copy_(loss.detach())

    if pool is not None and chunks.segments:
        run_split(pool)  # one chunk, its samples split over the pool's threads
    elif pool is None:
        for i in range(len(chunks.spans)):
            run(i)
    else:  # every chunk ends before a chunk's exception is re-raised (a retried step must not race its leftovers)
        futures = [pool.submit(run, i) for i in range(len(chunks.spans))]
        wait(futures)
        for f in futures:
            f.result()
    try:
        pack.update(step, per_clip, params, optimizer)
    except torch.OutOfMemoryError as e:  # weights may be half-updated: this step cannot be redone in smaller chunks
        raise RuntimeError(f"out of memory in the optimizer step of step {step}: {e}") from e
    return per_clip


@contextlib.contextmanager
def _clip_workers(device: torch.device, chunks: _Chunks, parallel_ok: bool):
    """On the CPU, the work of a step runs on worker threads at one intra-op thread each, one per core:

    - a pack of several chunks runs them on min(threads, chunks) workers, each chunk with threads // workers
      intra-op threads (torch's thread count is lowered for the loop and restored after);
    - a single chunk (one clip, say) has its N samples split into one segment per thread (`chunks.segments`,
      at least _MIN_SEGMENT samples each): each segment's INR forward and backward runs on a worker, the loss on
      the whole prediction on the calling thread at every intra-op thread (the INRs are pointwise in t).

    Why: one clip's step is hundreds of small, memory-bound ops (the KAN layer's local basis, gathers, scatters,
    the loss's STFTs) that gain little from a second intra-op thread, and OpenMP's threads meet at a barrier
    after every op: one descheduled thread stalls them all. Independent pieces of work on separate threads run
    side by side (torch releases the GIL inside its ops) and meet once per phase. Yields the pool, or None where
    chunks run one after the other: on CUDA (one launch stream), with one thread, and where not `parallel_ok`.
    Results do not depend on which worker runs what: every chunk writes only its own clips' slices, and split
    segments' gradients are summed in segment order.
    """
    threads = torch.get_num_threads()
    n_chunks, n_samples = len(chunks.spans), chunks.t.shape[0]
    if device.type != "cpu" or not parallel_ok or threads < 2:
        yield None
        return
    if n_chunks == 1:
        count = min(threads, n_samples // _MIN_SEGMENT)
        if count < 2:
            yield None
            return
        chunks.segments = [(n_samples * j // count, n_samples * (j + 1) // count) for j in range(count)]
        try:
            with ThreadPoolExecutor(count, initializer=_one_thread_worker) as pool:
                yield pool
        finally:
            chunks.segments = []
            torch.set_num_threads(threads)  # the workers' setting also became the default of threads started later
        return
    workers = min(threads, n_chunks)
    torch.set_num_threads(threads // workers)
    try:
        # flush-to-zero is a per-thread CPU flag: the workers set their own (see _flush_denormals)
        with ThreadPoolExecutor(workers, initializer=torch.set_flush_denormal, initargs=(True,)) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


# a split chunk's segments have at least this many samples: below, per-op overheads outweigh a second core
_MIN_SEGMENT = 4096


def _one_thread_worker() -> None:
    """A split segment's worker: one intra-op thread (once a thread has run torch ops its count is its own: the
    calling thread keeps every thread) and denormals flushed."""
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def _results(config, inr, seeds, params, buffers, pack: _PackState, final, pred, timing) -> list[FitResult]:
    """One FitResult per clip from the pack's final state, final losses [B] and predictions [B, N] (CPU)."""
    state = pack.state
    diverged_at = state["diverged_at"].cpu().tolist()
    best, best_step = state["best"].cpu(), state["best_step"].cpu()
    results = []
    for b in range(len(seeds)):
        # the final weights were never scored during the loop: they may beat the best in-loop loss
        best_b, best_step_b = float(best[b]), int(best_step[b])
        if diverged_at[b] < 0 and float(final[b]) <= best_b:
            best_b, best_step_b = float(final[b]), config.steps
        results.append(
            FitResult(
                reconstruction=pred[b].numpy().astype(np.float32),
                loss=float(final[b]),
                best_loss=best_b,
                best_step=best_step_b,
                # a clip that diverged at step d keeps the weights scored at step d - 1 (after d - 1 updates)
                steps=max(diverged_at[b] - 1, 0) if diverged_at[b] >= 0 else config.steps,
                steps_per_s=timing["steps_per_s"],
                seconds=timing["seconds"],
                num_params=int(inr.num_params()),
                diverged=diverged_at[b] >= 0,
                diverged_step=diverged_at[b] if diverged_at[b] >= 0 else None,
                seed=seeds[b],
                family=config.family,
                params={k: v[b].detach().cpu().clone() for k, v in params.items()},
                buffers={k: v[b].detach().cpu().clone() for k, v in buffers.items()},
                history=[(int(s), float(v)) for s, v in pack.history[b]],
            )
        )
    return results


@contextlib.contextmanager
def _flush_denormals(device: torch.device):
    """Flush denormal floats to zero on the CPU while fitting (restored after).

    Denormals (e.g. WIRE's Gabor envelopes far from their centre) make CPU arithmetic several times slower, and
    flushing them changes nothing measurable in a fit.
    """
    flushed = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _coordinates(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    from fewsound.inr import coordinates

    return coordinates(n, device=device, dtype=dtype)


def _log_record(losses: list[float], active: list[bool]) -> dict[str, float]:
    live = [v for v, a in zip(losses, active) if a]
    record = {"fit/loss": float(np.mean(live)) if live else float("nan")}
    if len(losses) > 1:
        record["fit/active"] = float(sum(active))
        record.update({f"fit/loss/clip{b}": v for b, v in enumerate(losses) if active[b]})
    return record


def _sha(x: torch.Tensor) -> str:
    return hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]


def _save_checkpoint(path, identity, step, params, pack: _PackState, optimizer) -> None:
    """Write the whole fit state to `path` atomically (temp file in the same folder + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "version": 1,
        **identity,
        "step": step,
        "params": {k: v.detach().cpu() for k, v in params.items()},
        "good": {k: v.cpu() for k, v in pack.good.items()},
        "state": {k: v.cpu() for k, v in pack.state.items()},
        "optimizer": optimizer.state_dict(),
        "history": pack.history,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path, identity, params, good, state, optimizer, device):
    """Restore a checkpoint into the fit's tensors in place; ConfigError if it belongs to another fit.

    Read onto the host, then copied to `device`: the optimizer's state ends as a fresh optimizer's after a step
    (moments on their parameter's device, AdamW's `step` a 0-dim CPU tensor). Read straight onto a GPU, `step` would
    stay there and the optimizer would read it back with `.item()` every step: a host sync per tensor per step."""
    # weights-only: a replaced file carrying a pickled object is refused in one line, its code never runs
    ckpt = load_weights_only(path, "cpu", what="fit checkpoint")
    for key, want in identity.items():
        if ckpt.get(key) != want:
            raise ConfigError(path, f"checkpoint is for another fit ({key}: {ckpt.get(key)!r} != {want!r})")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(ckpt["params"][k])
            good[k].copy_(ckpt["good"][k])
    for k in state:
        state[k] = ckpt["state"][k].to(device)
    optimizer.load_state_dict(ckpt["optimizer"])
    return int(ckpt["step"]), ckpt["history"]
