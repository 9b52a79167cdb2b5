"""Train FewSound (or HyperSound) data-parallel with Ray Train; MLflow records everything.

    ray job submit --working-dir . -- python jobs/train_fewsound.py   # Table 2's "FewSound 17.5M" (NeRF target)
    python jobs/train_fewsound.py --smoke-test                        # ~1 min on 2 CPU cores
    python jobs/train_fewsound.py --target kan --corpus /shared/vctk-fewsound --storage s3://bucket/train
    python jobs/train_fewsound.py --kind hypersound                   # Table 2's HyperSound baseline, same budget

What the defaults reproduce (on VCTK prepared with `--protocol fewsound`): FewSound + NeRF target + SoundStream
encoder + 17.5M preset is the paper's main setup, Table 2's "FewSound 17.5M" row (= Table 3's NERF row and
Table 5's SoundStream row). `--target kan|siren`: Table 3's other rows; `--kind hypersound --target
nerf|kan|siren`: Table 4 (its NeRF row is Table 2's HyperSound); `--encoder spectral|snac|whisper`: Table 5;
`--preset 41.2M`: Table 2's "FewSound 41.2M" and, per dataset, Table 6. jobs/hyper_tables.py runs them all.

Defaults are the paper's: batch 16, 10,000 random training crops of 32,768 samples per epoch, 2,500 epochs,
AdamW + OneCycle from lr 1e-5 (SIREN 1e-6), validation every 3 epochs. The paper's code's augmentations are off
unless asked for: `--phase-mangle 0.8 --dequantize-bits 16` is what that code did. `--set KEY=VALUE` overrides any field
of fewsound.train.TrainConfig (dotted, e.g. --set model.delta_warmup_epochs=50 --set schedule_step=epoch).

Re-running the same command resumes from the latest checkpoint (one per epoch, under --storage); a run already
finished is reported, not retrained. Workers: one per GPU when the cluster has GPUs, else CPU workers.

Ray 2.60 token authentication (https://docs.ray.io/en/latest/ray-security/token-auth.html). A local run
(`python jobs/train_fewsound.py`) starts its own Ray, which enables auth and creates ~/.ray/auth_token itself.
For a cluster, give the head and every client the same token:
    ray get-auth-token --generate          # once; writes ~/.ray/auth_token (copy it to the laptop and workers)
    ray start --head                       # finds the token, so authentication is on
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train_fewsound.py
or set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=/path/to/token for `ray start` and `ray job submit` alike
(tests/test_train_job.py does exactly that). The job itself needs nothing: its driver inherits the cluster's token.
"""

from __future__ import annotations

import argparse
import ast
import sys

from fewsound.cli import ArgumentParser, positive_int
from fewsound.config import override
from fewsound.errors import ConfigError, FewsoundError, Stopped
from fewsound.hyper import HyperConfig
from fewsound.train import TrainConfig

SMOKE = dict(
    preset="tiny",
    epochs=3,
    batch_size=4,
    samples_per_epoch=8,
    val_every=1,
    val_clips=4,
    log_clips=2,
    val_metrics=("mse", "psnr", "snr", "si_snr", "lsd"),
    lr=1e-4,
)


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build_config(args: argparse.Namespace) -> TrainConfig:
    model = HyperConfig(kind=args.kind, target=args.target, encoder=args.encoder, preset=args.preset)
    fields = {
        k: v
        for k, v in (
            ("epochs", args.epochs),
            ("batch_size", args.batch_size),
            ("lr", args.lr),
            ("samples_per_epoch", args.samples_per_epoch),
            ("val_every", args.val_every),
            ("val_clips", args.val_clips),
            ("schedule_step", args.schedule_step),
            ("seed", args.seed),
            ("phase_mangle", args.phase_mangle),
            ("dequantize_bits", args.dequantize_bits),
        )
        if v is not None
    }
    if args.metrics:
        fields["val_metrics"] = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if args.smoke_test:
        fields = {**{k: v for k, v in SMOKE.items() if k != "preset"}, **fields}
    cfg = TrainConfig(model=model, **fields)
    dotted = {}
    for item in args.set or []:
        if "=" not in item:
            raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        dotted[k.strip()] = parse_value(v.strip())
    return override(cfg, **dotted) if dotted else cfg


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="fewsound", help="fewsound | hypersound (default: fewsound)")
    p.add_argument(
        "--target", default="nerf", help="target INR: nerf | kan | siren (default: nerf, the paper's Table 2 rows)"
    )
    p.add_argument(
        "--encoder", default="soundstream", help="soundstream | spectral | snac | whisper (default: soundstream)"
    )
    p.add_argument("--preset", default="17.5M", help="model size: 17.5M | 41.2M | tiny (default: 17.5M)")
    p.add_argument(
        "--corpus",
        default=None,
        help="a corpus prepared with `jobs/prepare_data.py --protocol fewsound`: a folder every node sees, "
        "s3://..., gs://... (default: builtin:fewsound, prepared on each node on first use)",
    )
    p.add_argument("--epochs", type=positive_int, default=None, help="default 2,500")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default 16)")
    p.add_argument("--samples-per-epoch", type=int, default=None, help="random training crops per epoch (10,000)")
    p.add_argument("--lr", type=float, default=None, help="OneCycle start rate (default 1e-5, SIREN 1e-6)")
    p.add_argument("--schedule-step", default=None, help="batch (default) | epoch (as the paper's code)")
    p.add_argument("--val-every", type=int, default=None, help="epochs between validations (default 3)")
    p.add_argument("--val-clips", type=int, default=None, help="validation clips (default 512)")
    p.add_argument("--metrics", default=None, help="comma-separated validation metrics (default: all)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--phase-mangle",
        type=float,
        default=None,
        metavar="P",
        help="probability of a random all-pass filter per training crop (default 0: off; the paper's code 0.8)",
    )
    p.add_argument(
        "--dequantize-bits",
        type=int,
        default=None,
        metavar="BITS",
        help="add one BITS-bit quantisation step of uniform noise to training crops (default 0: off; code: 16)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any TrainConfig field")
    p.add_argument("--num-workers", type=int, default=None, help="default: one per GPU, else 2 CPU workers")
    p.add_argument(
        "--storage",
        default=None,
        help="checkpoint storage: a folder or a cloud URI (default: $FEWSOUND_HOME/train, ~/.fewsound/train)",
    )
    p.add_argument("--name", default=None, help="run name (default: derived from the config and corpus)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: train_fewsound)")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--max-failures", type=int, default=3, help="worker failures retried from the last checkpoint")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept in storage (default 2)")
    p.add_argument("--smoke-test", action="store_true", help="tiny model and corpus, a few steps, 2 CPU workers")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.preset = "tiny" if args.preset == "17.5M" else args.preset
        args.num_workers = args.num_workers or 2
        args.experiment = args.experiment or "train_fewsound-smoke"
    try:
        cfg = build_config(args)
        from tune.hyper.train import run_training

        s = run_training(
            cfg,
            corpus=args.corpus,
            storage=args.storage,
            name=args.name,
            experiment=args.experiment or "train_fewsound",
            num_workers=args.num_workers,
            address=args.address,
            max_failures=args.max_failures,
            keep_checkpoints=args.keep_checkpoints,
        )
    except FewsoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # SIGINT/SIGTERM
        print(e, file=sys.stderr)
        return e.exit_code
    state = "already finished" if s.already_finished else f"trained in {s.seconds:.0f} s"
    print(f"\nrun {s.key}: {state}; {s.epochs_done} epochs on {s.workers} {'GPU' if s.use_gpu else 'CPU'} worker(s)")
    shown = {k: v for k, v in sorted(s.metrics.items()) if k.startswith(("train/loss", "val/", "eval/", "universal/"))}
    for k, v in shown.items():
        if isinstance(v, (int, float)):
            print(f"  {k:24s} {v:.4g}")
    print(f"MLflow: {s.ui_url}  run {s.run_id} (experiment {s.experiment!r})")
    print(f"checkpoints: {s.storage}/{s.key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
