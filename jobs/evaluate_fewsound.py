"""Evaluate trained FewSound / HyperSound models on a corpus's validation split: the paper's Tables 2-6 row(s).

    python jobs/evaluate_fewsound.py --model RUN_ID                           # an MLflow run of train_fewsound
    python jobs/evaluate_fewsound.py --model ~/.fewsound/train/train-fewsound-kan-1234abcd --model HS_RUN_ID
    python jobs/evaluate_fewsound.py --model model.pt --table 6 --dataset LibriSpeech --corpus /shared/libri-fs

--model (repeatable): an MLflow run id, a model file (save_model), a training checkpoint folder, or a run's
checkpoint storage folder (its latest epoch). Give a FewSound and a HyperSound model for the side-by-side of
Table 2. Each clip is the deterministic validation crop (start 0) at the model's clip length; every metric of
fewsound.metrics that applies to the clip's kind. Long audio (--long-seconds, default 10): one speaker's
validation segments end to end, reconstructed window by window, against the same clip's first window alone.
Prints the tables (mean +- std over clips, the paper's numbers beside) and, with --out, writes results.csv,
table.md/.tex/.csv. MLflow: the results go on the model's run when --model is a run id, else on a new run of
--experiment (rows, tables, example audio, means as `evaluation/<metric>`).
"""

from __future__ import annotations

import argparse
import sys

from fewsound.cli import ArgumentParser, positive_int
from fewsound.errors import FewsoundError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument(
        "--dataset",
        default=None,
        help="Table 6's dataset of the corpus (VCTK, noisy VCTK, LibriSpeech, LJ Speech, GTZAN, UrbanSound8K; "
        "default: from the corpus's importer layout)",
    )
    p.add_argument(
        "--clips", type=positive_int, default=None, help="evaluate the first N validation clips (default: all)"
    )
    p.add_argument("--metrics", default=None, help="comma-separated metrics (default: all)")
    p.add_argument("--long-seconds", type=float, default=10.0, help="long-audio clip length; 0: no long audio")
    p.add_argument("--out", default=None, help="folder for results.csv and table.md/.tex/.csv")
    p.add_argument("--experiment", default="evaluate_fewsound", help="MLflow experiment of runs for model files")
    p.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")
    p.add_argument("--smoke-test", action="store_true", help="4 clips, fast metrics, 1 s of long audio")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.clips = args.clips or 4
        args.metrics = args.metrics or "mse,psnr,si_snr,lsd"
        args.long_seconds = min(args.long_seconds, 1.0)
    return args


def model_run(source: str, model, experiment: str):
    """The MLflow run to log on: the model's own run (an id), else a new run with the model's config."""
    from fewsound.config import flatten
    from fewsound.hyper.trained import is_run_id
    from fewsound.tracking import MlflowRun

    if is_run_id(source):
        return MlflowRun(experiment, run_id=source)
    run = MlflowRun(experiment, run_name=f"evaluate {model.describe()}", tags={"fewsound.model_source": source})
    run.log_params(flatten(model.config, prefix="model."))
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from fewsound.data.corpus import open_corpus
        from fewsound.hyper.trained import load_trained
        from fewsound.tables import DATASET_NAMES, build_table, hyper_label, to_markdown, write_results
        from tune.hyper.evaluation import LONG_GROUP, evaluate_trained, evaluation_key, log_evaluation, validation_set
        from tune.hyper.train import resolve_train_corpus

        models = [load_trained(m) for m in args.model]
        kinds_of = {m.config.kind for m in models}
        table = args.table if args.table is not None else (2 if kinds_of == {"fewsound", "hypersound"} else None)
        corpus = open_corpus(resolve_train_corpus(args.corpus, max(m.config.clip_length for m in models)))
        dataset = args.dataset or DATASET_NAMES.get(str(corpus.manifest.get("layout")), corpus.name)
        segments, meta = validation_set(str(corpus.root), args.clips)
        metrics = [x.strip() for x in args.metrics.split(",")] if args.metrics else None
        rows, long_rows, labels = [], [], []
        for source, model in zip(args.model, models):
            label = hyper_label(model.config, table)
            if label in labels:
                label = f"{label} [{source[-8:]}]"
            labels.append(label)
            print(f"evaluating {label} on {len(segments)} validation clips of {corpus.root}", file=sys.stderr)
            ev = evaluate_trained(
                model, segments, meta, label=label, metrics=metrics, long_seconds=args.long_seconds or None
            )
            rows += [{**r, "group": dataset} if table == 6 else r for r in ev.rows]
            long_rows += ev.long_rows
            if not args.no_mlflow:
                key = evaluation_key(source, str(corpus.root), args.clips, metrics, args.long_seconds)
                run = model_run(source, model, args.experiment)
                log_evaluation(run, ev, key, title=f"{label} on {dataset}", sample_rate=model.config.sample_rate)
                print(f"logged to MLflow run {run.run_id} ({run.uri})", file=sys.stderr)
        title = f"Validation reconstruction ({dataset})" + (f", paper Table {table}" if table else "")
        spec = dict(title=title, row_header="Model", paper_table=table, label_order=labels)
        print(to_markdown(build_table(rows, **spec)))
        long_spec = dict(title=f"Long audio ({dataset}): windowed vs one window", row_header="Model")
        if long_rows:
            print(to_markdown(build_table(long_rows, **long_spec)))
        if args.out:
            paths = write_results(args.out, rows, **spec)
            if long_rows:
                paths += write_results(f"{args.out}/{LONG_GROUP.replace(' ', '_')}", long_rows, **long_spec)
            for path in paths:
                print(f"wrote {path}", file=sys.stderr)
    except FewsoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
