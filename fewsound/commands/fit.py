"""`python -m fewsound fit CLIP --inr kan --steps 2000 --out DIR`: fit one INR to one audio clip.

Writes to DIR: `gt.wav` (the peak-normalised, cropped target), `pred.wav` (the INR's reconstruction),
`spectrogram.png` (target | prediction | difference, dB), `metrics.json` (loss and quality metrics, cost, the
config) and `params.pt` (the fitted network: params and buffers, no batch axis).

The clip is resampled to --sr, cropped to --length samples from --offset (default 32,768 = the paper's 1.5 s
Table 1 crop; --length 0 keeps the whole file) and peak-normalised, as in the paper.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fewsound.errors import AudioError, ConfigError

DEFAULT_LENGTH = 32_768


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("clip", help="audio file (anything libsndfile reads: wav, flac, ogg, ...)")
    p.add_argument("--inr", default="kan", help="INR family: kan, nerf, siren, finer, wire, rff (default kan)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")
    p.add_argument("--steps", type=int, default=10_000, help="fit steps (default 10,000, the paper's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the family's, see fewsound.fit)")
    p.add_argument("--optimizer", default="adamw", help="adamw (the paper) or adam (the paper's code)")
    p.add_argument("--weight-decay", type=float, default=None, help="default 0.01 for adamw, 0 for adam")
    p.add_argument("--lambda-t", type=float, default=1.0, help="weight of the L1 term (default 1)")
    p.add_argument("--lambda-f", type=float, default=1.0, help="weight of the mel-STFT term (default 1)")
    p.add_argument("--seed", type=int, default=0, help="init seed (default 0)")
    p.add_argument("--sr", type=int, default=22_050, help="sample rate to resample to (default 22,050)")
    p.add_argument(
        "--length",
        type=int,
        default=DEFAULT_LENGTH,
        help=f"crop length in samples (default {DEFAULT_LENGTH:,}; 0 = whole file)",
    )
    p.add_argument("--offset", type=int, default=0, help="crop start in samples (default 0)")
    p.add_argument(
        "--set",
        dest="inr_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the INR's config, e.g. --set grid_size=5 (repeatable)",
    )
    p.add_argument(
        "--metrics",
        default="all",
        help="comma-separated metric names for metrics.json, or 'all' (the paper's set; default)",
    )
    p.add_argument("--kind", default="speech", help="speech, noisy_speech, music or environment (which metrics apply)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--precision",
        default="full",
        help="full (default) or bf16: the INR forward under bfloat16 autocast, float32 accumulation",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default="off",
        metavar="MODE",
        help="torch.compile the INR forward (MODE: default, or reduce-overhead for CUDA graphs on a GPU); "
        "falls back to eager with one line if compiling fails",
    )
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint to DIR/checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint/fit.pt if it exists")
    p.add_argument("--log-every", type=int, default=500, help="print the loss every N steps (default 500)")


def run(args: argparse.Namespace) -> int:
    from fewsound.fit import fit

    config = _config(args)
    target = _target(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = out / "checkpoint" if (args.checkpoint_every or args.resume) else None
    print(
        f"fitting {config.family} ({config.build_inr().num_params():,} params) to {args.clip}: "
        f"{target.size:,} samples at {args.sr} Hz, {config.steps:,} steps, lr {config.resolved_lr:g}",
        flush=True,
    )
    (result,) = fit(config, target[None], logger=_PrintLogger(), checkpoint_dir=checkpoint_dir, resume=args.resume)
    metrics = _write_outputs(args, config, target, result)
    shown = [k for k in ("fit/loss", "eval/mse", "eval/psnr", "eval/si_snr", "eval/pesq") if k in metrics]
    summary = ", ".join(f"{k.split('/')[-1]} {metrics[k]:.4g}" for k in shown)
    print(f"{summary}; {result.steps_per_s:.2f} steps/s; wrote {out}")
    if result.diverged:
        print(
            f"error: the fit diverged at step {result.diverged_step} (non-finite loss); outputs are from its last"
            f" finite weights - try a lower --lr",
            file=sys.stderr,
        )
        return 1
    return 0


def _config(args: argparse.Namespace):
    """The FitConfig of the command line; a bad --set key, metric name or length fails here, before any audio."""
    from fewsound.fit import FitConfig

    config = FitConfig(
        family=args.inr,
        inr=_parse_overrides(args.inr_set),
        steps=args.steps,
        lr=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        lambda_t=args.lambda_t,
        lambda_f=args.lambda_f,
        sample_rate=args.sr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        log_every=max(args.log_every, 1),
        device=args.device,
        precision=args.precision,
        compile=args.compile,
    )
    config.build_inr()
    _check_metric_names(args.metrics, args.kind)
    if args.length < 0 or args.offset < 0:
        raise ConfigError("--length/--offset", f"must be >= 0, got {args.length}/{args.offset}")
    return config


def _target(args: argparse.Namespace) -> np.ndarray:
    """The clip at --sr, cut to --offset/--length, peak-normalised: [N] float32."""
    from fewsound.data.audio import load_audio, peak_normalize

    x = load_audio(args.clip, sr=args.sr)
    if args.length:
        if x.size < args.offset + args.length:
            raise AudioError(
                args.clip,
                f"too short: {x.size} samples at {args.sr} Hz, need {args.offset + args.length}"
                f" for --offset {args.offset} --length {args.length} (--length 0: whole file)",
            )
        x = x[args.offset : args.offset + args.length]
    else:
        x = x[args.offset :]
    return peak_normalize(x, where=args.clip)


def _write_outputs(args: argparse.Namespace, config: Any, target: np.ndarray, result: Any) -> dict[str, Any]:
    """gt.wav, pred.wav, spectrogram.png, params.pt and metrics.json in --out; returns the metrics."""
    import torch

    from fewsound.data.audio import save_audio
    from fewsound.report import save_spectrogram_png

    out: Path = args.out
    save_audio(out / "gt.wav", target, args.sr)
    save_audio(out / "pred.wav", result.reconstruction, args.sr)
    title = f"{config.family} - {Path(args.clip).name}"
    save_spectrogram_png(out / "spectrogram.png", target, result.reconstruction, args.sr, title=title)
    torch.save(
        {"family": config.family, "inr": dict(config.inr), "params": result.params, "buffers": result.buffers},
        out / "params.pt",
    )
    metrics = {
        **quality_metrics(target, result.reconstruction, args.sr, metrics=args.metrics, kind=args.kind),
        **result.metrics(),
        "fit/best_loss": result.best_loss,
        "fit/steps": result.steps,
        "fit/diverged": result.diverged,
        "fit/diverged_step": result.diverged_step,
        "clip": str(args.clip),
        "samples": int(target.size),
        "sample_rate": args.sr,
        "config": {**_jsonable(config), "lr": config.resolved_lr, "weight_decay": config.resolved_weight_decay},
        "fit_key": config.key_hash(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=True) + "\n")
    return metrics


def quality_metrics(ref: np.ndarray, pred: np.ndarray, sr: int, metrics: str = "all", kind: str = "speech") -> dict:
    """`{"eval/<name>": value}` of fewsound.metrics.evaluate, plus `eval/not_applicable` reasons (if any)."""
    from fewsound.metrics import METRICS, evaluate, to_mlflow

    names = list(METRICS) if metrics == "all" else [m.strip() for m in metrics.split(",") if m.strip()]
    (row,) = evaluate(ref[None], pred[None], sr, kind=kind, metrics=names)
    out: dict = to_mlflow(row)
    if row["not_applicable"]:
        out["eval/not_applicable"] = row["not_applicable"]
    return out


def _check_metric_names(metrics: str, kind: str) -> None:
    """Fail before fitting, not after, on a bad --metrics / --kind."""
    from fewsound.metrics import EXTRA_METRICS, KINDS, METRICS

    if kind not in KINDS:
        raise ConfigError("--kind", f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if metrics != "all":
        unknown = [m for m in metrics.split(",") if m.strip() and m.strip() not in METRICS + EXTRA_METRICS]
        if unknown or not metrics.strip():
            raise ConfigError(
                "--metrics", f"unknown metric(s) {unknown}; expected 'all' or names from {METRICS + EXTRA_METRICS}"
            )


class _PrintLogger:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        print(f"step {step + 1:>6}  loss {metrics['fit/loss']:.5f}", flush=True)


def _parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}", "expected KEY=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word, e.g. a mode name
        overrides[key.strip()] = value
    return overrides


def _jsonable(config) -> dict:
    from fewsound.config import to_dict

    return json.loads(json.dumps(to_dict(config), default=str))
