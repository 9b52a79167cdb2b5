"""Device and memory policy: which device a process uses, how it shares a GPU, and the numerics it runs at.

    hide_gpus(gpu_ids)                 # a Ray task/trial given no GPU: torch and CDPAM see none
    claim_gpu_share(0.25)              # a trial of 1/4 GPU: its process capped at 1/4 of the card's memory
    chunk = clips_per_chunk("wire", 65_536, 16, free_bytes=..., total_bytes=..., share=0.25)   # pure sizing
    result, chunk = split_on_oom(run, chunk)   # run(chunk); on out-of-memory, run(chunk // 2), ...
    release_cached_memory()            # between packs: the caching allocator's free blocks back to the card

A GPU share in Ray is only bookkeeping: a trial of 1/4 GPU may allocate the whole card. So a trial caps its process
at its share (torch.cuda.set_per_process_memory_fraction), sizes each pack's forward/backward chunks to the memory
its share leaves (`clips_per_chunk`, from the bytes autograd keeps per clip-sample of each family, measured by
benchmarks/clip_memory.py), releases cached memory between packs, and a chunk that still runs out of memory is
halved and run again (`split_on_oom`) rather than failing the pack.

Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone in a task or actor given 0 GPUs, so such a worker sees every GPU of its
node and `device="auto"` (and CDPAM) would pick cuda:0, unaccounted. `hide_gpus` sets CUDA_VISIBLE_DEVICES="" in
such a worker; it must run before the process first asks torch about CUDA (the CUDA driver reads the variable
once, when it initialises).

Numerics (`set_numerics`, applied wherever fewsound resolves a device): float32 matmuls and cuDNN convolutions run
in full float32, not TF32. TF32 keeps 10 mantissa bits (relative step 2**-11); SIREN's and FINER's first layers
compute phases of omega_0 * t with omega_0 = 2000 rad, where a 2**-11 relative error is about one radian of phase,
the same failure as bfloat16 autocast (see INR.autocast_safe in fewsound.inr.base). Convolutions (CDPAM, the
hypernetworks' encoders) stay float32 too, so a metric or a training step computed on a GPU matches the CPU's to
float32 rounding. Speed in reduced precision is asked for explicitly (`FitConfig.precision="bf16"`), never implied
by the device.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from fewsound.errors import ConfigError

T = TypeVar("T")

# Bytes autograd keeps per clip and per sample for one training step of each family at its default (Table 1)
# size, with the paper's loss (saved tensors of the INR forward and of the loss, counted once per storage).
# Measured on the CPU by benchmarks/clip_memory.py (benchmarks/results/clip_memory.json; tests/test_device.py
# checks that this table is that file's). The saved memory is linear in the samples, and the same on any device.
BYTES_PER_SAMPLE: dict[str, float] = {
    "finer": 7269.3,
    "kan": 1929.3,
    "nerf": 2081.3,
    "rff": 2345.3,
    "siren": 3709.3,
    "wire": 6789.3,
}
CLIP_MEMORY_RESULT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "clip_memory.json"
# A family missing from the table (a new one, before the benchmark is re-run) is sized as the dearest known one.
# Peak memory during backward exceeds what was saved (gradients of activations, the STFTs' temporaries): a margin.
PEAK_FACTOR = 1.5
# Kept out of a trial's budget: CUDA context of libraries, CDPAM's model and the evaluation, the pack's weights,
# gradients and AdamW moments, the allocator's fragmentation.
RESERVE_BYTES = 768 * 2**20

_share: float = 1.0  # this process's GPU share (claim_gpu_share); 1.0 outside a fractional trial


def bytes_per_sample(family: str) -> float:
    """Bytes autograd keeps per clip-sample for `family` (BYTES_PER_SAMPLE; an unknown family: the largest)."""
    if not BYTES_PER_SAMPLE:
        raise RuntimeError(f"BYTES_PER_SAMPLE is empty: run benchmarks/clip_memory.py ({CLIP_MEMORY_RESULT})")
    return BYTES_PER_SAMPLE.get(family, max(BYTES_PER_SAMPLE.values()))


def clips_per_chunk(
    family: str,
    n_samples: int,
    n_clips: int,
    *,
    free_bytes: int,
    total_bytes: int,
    share: float = 1.0,
    reserve_bytes: int = RESERVE_BYTES,
) -> int:
    """Clips per forward/backward chunk of a pack of `n_clips` clips of `n_samples` samples, on a GPU with
    `free_bytes` free of `total_bytes`, for a process whose share of that GPU is `share` (0 < share <= 1).

    Budget: the share of the card (total * share, the process's cap), no more than is free now, less
    `reserve_bytes`; a clip costs bytes_per_sample(family) * n_samples * PEAK_FACTOR. The chunk is the most clips
    the budget holds (at least 1: a chunk that still does not fit is split by `split_on_oom`, down to one clip),
    then evened out: 16 clips of which 6 fit run as 6 + 5 + 5, not 6 + 6 + 4. Pure: no device is touched.
    """
    if not (0 < share <= 1):
        raise ValueError(f"share must be in (0, 1], got {share}")
    if n_clips < 1 or n_samples < 1:
        raise ValueError(f"need n_clips >= 1 and n_samples >= 1, got {n_clips}, {n_samples}")
    budget = min(free_bytes, total_bytes * share) - reserve_bytes
    per_clip = bytes_per_sample(family) * n_samples * PEAK_FACTOR
    fit = max(1, min(n_clips, int(budget // per_clip))) if budget > 0 else 1
    n_chunks = math.ceil(n_clips / fit)
    return math.ceil(n_clips / n_chunks)


def cuda_clips_per_chunk(device: torch.device, family: str, n_samples: int, n_clips: int) -> int:
    """clips_per_chunk for a pack on CUDA `device`, from its free memory now and this process's share."""
    free, total = torch.cuda.mem_get_info(device)
    return clips_per_chunk(family, n_samples, n_clips, free_bytes=free, total_bytes=total, share=_share)


def claim_gpu_share(share: float | None) -> float:
    """This process uses `share` of its GPU (a Ray trial's fractional GPU): cap the caching allocator at that
    fraction of the card's memory (allocations beyond it raise torch.OutOfMemoryError, which `split_on_oom`
    handles) and size chunks for it. None, 0 or no CUDA: nothing to cap (returns the share chunks are sized for)."""
    global _share
    if not share or not torch.cuda.is_available():
        return _share
    if not (0 < share <= 1):
        raise ValueError(f"GPU share must be in (0, 1], got {share}")
    _share = float(share)
    torch.cuda.set_per_process_memory_fraction(_share)
    return _share


def release_cached_memory() -> None:
    """Give the caching allocator's unused blocks back to the GPU (between packs: a long-lived trial process
    otherwise keeps its largest pack's memory for the rest of the sweep). No-op without an initialised CUDA."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError)


def split_on_oom(
    run: Callable[[int], T], chunk: int, *, release: Callable[[], None] = release_cached_memory
) -> tuple[T, int]:
    """run(chunk); if it raises torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class), release
    cached memory and run(chunk // 2), and so on down to run(1), whose out-of-memory error propagates.
    Returns (run's result, the chunk that worked): the caller keeps that chunk for what follows.

    `run` must be repeatable: a failed attempt may leave partial work that the next attempt redoes from scratch
    (fewsound.fit zeroes the gradients at the start of each attempt of a step).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    while True:
        try:
            return run(chunk), chunk
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            release()
            chunk //= 2


def hide_gpus(gpu_ids: Sequence[object]) -> bool:
    """In a worker given `gpu_ids` (ray.get_gpu_ids()): none -> CUDA_VISIBLE_DEVICES="" so torch (device "auto")
    and CDPAM run on the CPU. Returns whether the GPUs were hidden. Call it before anything asks torch about CUDA
    in the process; a worker given GPUs keeps the CUDA_VISIBLE_DEVICES Ray set for it."""
    if gpu_ids:
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return True


def set_numerics() -> None:
    """The numerics every fewsound computation runs at (see the module docstring): float32 matmuls and cuDNN
    convolutions in full float32 precision, TF32 off. Idempotent; called wherever a device is resolved."""
    torch.set_float32_matmul_precision("highest")  # also sets torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto": CUDA when present, else the CPU; else `device` itself. Sets fewsound's numerics (no TF32: set_numerics
    above) for whatever runs on it. A device torch does not know is a one-line ConfigError."""
    set_numerics()
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError("device", str(e)) from None


def _load_table(path: Path = CLIP_MEMORY_RESULT) -> dict[str, float]:
    """{family: bytes per clip-sample} of benchmarks/clip_memory.py's result file ({} if it is missing)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {row["family"]: float(row["bytes_per_sample"]) for row in data["rows"]}
