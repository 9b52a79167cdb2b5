"""The hypernetwork half of the paper as one command: Tables 2-6 trained, evaluated and tabled in MLflow.

    python jobs/hyper_tables.py --smoke-test                         # the whole grid's shape on tiny models (CPU)
    python jobs/hyper_tables.py --tables 2,3 --datasets VCTK=/data/vctk-fewsound
    python jobs/hyper_tables.py --tables 6 --datasets VCTK=/d/vctk,LibriSpeech=/d/libri,GTZAN=/d/gtzan --epochs 500
    ray job submit --working-dir . -- python jobs/hyper_tables.py --num-workers 1 --parallel 4

Rows: Table 2 FewSound (17.5M, 41.2M) vs HyperSound; Table 3 FewSound with NeRF/KAN/SIREN targets; Table 4
HyperSound with the same; Table 5 FewSound with each encoder (the Whisper rows need --whisper
large-v2=PATH,tiny.en=PATH, local checkpoints: nothing is downloaded; without them those rows are listed as not
run); Table 6 FewSound 41.2M NeRF/KAN on each --datasets corpus. Tables 2-5 use the first dataset (the paper's
VCTK). Corpora are prepared with `jobs/prepare_data.py --protocol fewsound`; default: the built-in corpus.

Every training is a child run of one MLflow parent (Ray Train, as jobs/train_fewsound.py), evaluated as soon as it
finishes (rows and tables on the child); the parent gets the paper-style tables (mean ± std, the paper's
numbers beside; Markdown, LaTeX, CSV), the long-audio table and spectrogram grids. Rows shared by tables (Table
2's FewSound 17.5M is Table 3's NERF and Table 5's SoundStream) are one training. Re-running the same command
skips every finished training and evaluation. --smoke-test: tiny models, 2 epochs of 8 clips, Table 6's six
datasets all on the built-in corpus (its shape only), 1 s of long audio.
"""

from __future__ import annotations

import argparse
import ast
import sys

from fewsound.cli import ArgumentParser, positive_int
from fewsound.errors import ConfigError, FewsoundError, Stopped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default="2,3,4,5,6", help="paper tables to regenerate (default: 2,3,4,5,6)")
    p.add_argument("--datasets", default=None, help="NAME=CORPUS,... (default: the built-in corpus)")
    p.add_argument(
        "--epochs", type=positive_int, default=None, help="epochs of every training (default: the paper's 2,500)"
    )
    p.add_argument("--whisper", default=None, help="Whisper checkpoints: large-v2=PATH,tiny.en=PATH")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a TrainConfig field everywhere")
    p.add_argument(
        "--clips", type=positive_int, default=None, help="evaluate the first N validation clips (default: all)"
    )
    p.add_argument("--metrics", default=None, help="comma-separated evaluation metrics (default: all)")
    p.add_argument("--long-seconds", type=float, default=10.0, help="long-audio clip length; 0: none (default 10)")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers per training (default: all GPUs)")
    p.add_argument("--parallel", type=int, default=None, help="trainings at once (default: what the cluster holds)")
    p.add_argument("--storage", default=None, help="checkpoint storage (default: $FEWSOUND_HOME/train)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: hyper_tables)")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--smoke-test", action="store_true", help="the whole grid's shape on tiny models, minutes of CPU")
    return p.parse_args(argv)


def settings(args: argparse.Namespace):
    from tune.hyper.grid_plan import Settings

    overrides = {}
    for item in args.set or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
        try:
            overrides[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            overrides[k.strip()] = v.strip()
    whisper = {}
    for item in (args.whisper or "").split(","):
        if item.strip():
            size, sep, path = item.partition("=")
            if not sep or size.strip() not in ("large-v2", "tiny.en"):
                raise ConfigError("--whisper", f"expected large-v2=PATH or tiny.en=PATH, got {item!r}")
            whisper[size.strip()] = path.strip()
    smoke = args.smoke_test
    return Settings(
        train={"epochs": args.epochs} if args.epochs else {},
        overrides=overrides,
        whisper=whisper,
        smoke=smoke,
        experiment=args.experiment or ("hyper_tables-smoke" if smoke else "hyper_tables"),
        storage=args.storage,
        num_workers=args.num_workers or (1 if smoke else None),
        parallel=args.parallel,
        address=args.address,
        clips=args.clips or (4 if smoke else None),
        metrics=[m.strip() for m in args.metrics.split(",")]
        if args.metrics
        else (["mse", "psnr", "si_snr", "lsd"] if smoke else None),
        long_seconds=(min(args.long_seconds, 1.0) if smoke else args.long_seconds) or None,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from fewsound.hyper.catalogue import paper_cells, parse_datasets
        from tune.hyper.grid import run_grid

        try:
            tables = [int(t) for t in args.tables.split(",") if t.strip()]
        except ValueError:
            raise ConfigError("--tables", f"expected numbers like 2,3,6, got {args.tables!r}") from None
        corpora = parse_datasets(args.datasets, args.smoke_test)
        s = run_grid(paper_cells(tables, list(corpora)), corpora, settings(args))
    except FewsoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # SIGINT/SIGTERM
        print(e, file=sys.stderr)
        return e.exit_code
    print("\n" + s.markdown)
    print(
        f"{s.trainings} trainings: {s.trained} trained, {s.evaluated} evaluated, {s.skipped} found finished, "
        f"{len(s.failed)} failed, {len(s.not_run)} rows not run; {s.seconds:.0f} s"
    )
    print(f"MLflow: {s.tracking_uri}  parent run {s.parent_run_id} (tables/ and tables/plots/ there)")
    return 1 if s.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
