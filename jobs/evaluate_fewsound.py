"""Evaluate trained FewSound / HyperSound models on a corpus's validation split: the paper's Tables 2-6 row(s).

    python jobs/evaluate_fewsound.py --model RUN_ID                           # an MLflow run of train_fewsound
    python jobs/evaluate_fewsound.py --model ~/.fewsound/train/train-fewsound-kan-1234abcd --model HS_RUN_ID
    python jobs/evaluate_fewsound.py --model model.pt --table 3 --corpus /shared/vctk-fewsound --out results/

--model (repeatable): an MLflow run id, a model file (save_model), a training checkpoint folder, or a run's
checkpoint storage folder (its latest epoch). Give a FewSound and a HyperSound model for the side-by-side of
Table 2. Each clip is the deterministic validation crop (start 0) at the model's clip length; every metric of
fewsound.metrics that applies to the clip's kind. Prints the table (mean +- std over clips, the paper's numbers
beside) and, with --out, writes results.csv, table.md/.tex/.csv.
"""

from __future__ import annotations

import argparse
import sys

from fewsound.errors import ConfigError, FewsoundError

ENCODER_LABELS = {"soundstream": "SoundStream", "spectral": "Spectral", "snac": "SNAC", "whisper": "Whisper L"}


def label_for(cfg, table: int | None) -> str:
    """The row label the paper's table uses for a model of config `cfg`."""
    if table == 2:
        return "HyperSound" if cfg.kind == "hypersound" else f"FewSound {cfg.preset}"
    if table in (3, 4, 6):
        return cfg.target.upper()
    if table == 5:
        return ENCODER_LABELS[cfg.encoder]
    return f"{'HyperSound' if cfg.kind == 'hypersound' else 'FewSound'}-{cfg.target.upper()} ({cfg.preset})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="MLflow run id, model file or checkpoint folder")
    p.add_argument("--corpus", default=None, help="prepared corpus (default: the built-in one, fewsound protocol)")
    p.add_argument(
        "--table",
        type=int,
        default=None,
        choices=[2, 3, 4, 5, 6],
        help="label rows as this paper "
        "table and show its numbers (default: 2 when FewSound and HyperSound are compared, else none)",
    )
    p.add_argument("--clips", type=int, default=None, help="evaluate the first N validation clips (default: all)")
    p.add_argument("--metrics", default=None, help="comma-separated metrics (default: all)")
    p.add_argument("--out", default=None, help="folder for results.csv and table.md/.tex/.csv")
    p.add_argument("--smoke-test", action="store_true", help="4 clips, fast metrics")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.clips = args.clips or 4
        args.metrics = args.metrics or "mse,psnr,si_snr,lsd"
    try:
        from fewsound.data.shards import open_corpus
        from fewsound.tables import build_table, to_markdown, write_results
        from fewsound.train import evaluate_model
        from tune.train_job import load_trained, resolve_train_corpus

        models = [load_trained(m) for m in args.model]
        kinds_of = {m.config.kind for m in models}
        table = args.table if args.table is not None else (2 if kinds_of == {"fewsound", "hypersound"} else None)
        corpus = open_corpus(resolve_train_corpus(args.corpus, max(m.config.clip_length for m in models)))
        segments, meta = corpus.arrays("validation")
        if args.clips is not None:
            if args.clips < 1:
                raise ConfigError("--clips", f"must be >= 1, got {args.clips}")
            segments, meta = segments[: args.clips], meta[: args.clips]
        metrics = [x.strip() for x in args.metrics.split(",")] if args.metrics else None
        rows, labels = [], []
        for source, model in zip(args.model, models):
            label = label_for(model.config, table)
            if label in labels:
                label = f"{label} [{source[-8:]}]"
            labels.append(label)
            print(f"evaluating {label} on {len(segments)} validation clips of {corpus.root}", file=sys.stderr)
            rows += evaluate_model(
                model, segments, [m["kind"] for m in meta], [m["clip_id"] for m in meta], label=label, metrics=metrics
            )
        title = f"Validation reconstruction ({corpus.name})" + (f", paper Table {table}" if table else "")
        print(to_markdown(build_table(rows, title=title, row_header="Model", paper_table=table, label_order=labels)))
        if args.out:
            for path in write_results(
                args.out, rows, title=title, row_header="Model", paper_table=table, label_order=labels
            ):
                print(f"wrote {path}", file=sys.stderr)
    except FewsoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
