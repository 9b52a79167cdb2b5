"""`python -m fewsound reconstruct MODEL IN.wav OUT.wav`: reconstruct any-length audio with a trained hypernetwork.

MODEL is a checkpoint written by `fewsound.hyper.save_model`. IN is read as mono at the model's sample rate
(resampled when needed), cut into overlapping windows of the model's clip length, reconstructed in batches and
stitched with raised-cosine crossfades (`fewsound.hyper.reconstruct_long`). OUT has the same number of samples
as IN at the model's rate, and is written at that rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="model checkpoint written by fewsound.hyper.save_model")
    parser.add_argument("input", type=Path, help="audio file to reconstruct (any length, any rate)")
    parser.add_argument("output", type=Path, help="where to write the reconstruction (format from the suffix)")
    parser.add_argument(
        "--overlap",
        type=int,
        default=None,
        help="samples shared by neighbouring windows (default: a quarter of the window)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    parser.add_argument(
        "--no-normalize",
        action="store_true",
        help="do not peak-normalise each window before the model (training clips are)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")


def run(args: argparse.Namespace) -> int:
    from fewsound.data.audio import load_audio, save_audio
    from fewsound.device import resolve_device
    from fewsound.errors import ConfigError
    from fewsound.hyper import load_model, reconstruct_long

    device = resolve_device(args.device or "auto")  # CUDA when present; fewsound's numerics (no TF32)
    model = load_model(args.model, map_location=device)
    cfg = model.config
    window = cfg.clip_length
    if args.overlap is not None and not 0 <= args.overlap < window:
        raise ConfigError("--overlap", f"must be in [0, {window}) for this model's {window}-sample window")
    if args.batch_size < 1:
        raise ConfigError("--batch-size", f"must be at least 1, got {args.batch_size}")
    audio = load_audio(args.input, sr=cfg.sample_rate)
    y = reconstruct_long(
        model, audio, overlap=args.overlap, batch_size=args.batch_size, normalize=not args.no_normalize
    )
    save_audio(args.output, y.numpy(), sr=cfg.sample_rate)
    print(
        f"{args.output}: {y.numel():,} samples at {cfg.sample_rate} Hz from {args.input} ({model.describe()})",
        file=sys.stderr,
    )
    return 0
