"""The paper's KAN ablation (Tables 7-10 and 12-17): one knob at a time around the base configuration
(encoding length 8, grid 10, spline order 2, layers [48, 24, 12], lr 5e-3, scale_spline on: 31,080 params),
on 10 speech clips at 1.5 s and 3 s.

    python jobs/kan_ablation.py                                   # every knob, the paper's protocol (10,000 steps)
    python jobs/kan_ablation.py --knobs grid_size,spline_order --steps 300 --clips 3 --lengths 1.5
    ray job submit --working-dir . -- python jobs/kan_ablation.py --corpus /shared/vctk-inr-3s

Knobs: encoding_length (2/4/8/10/12/16/24), layers (the paper's 7 rows), spline_order (1/2/3/5/7), grid_size
(1/5/10/12/17), lr (0.01/0.007/0.006/0.005/0.001), scale_spline (False/True). The base is fitted once and shared
by every knob's table. Results: one MLflow parent run with one table per knob (rows labelled as the paper
prints them, the paper's numbers in parentheses) and plots/quality_vs_params.png; one child run per fit.
Re-running the same command skips every fit already finished.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from fewsound.ablation import KNOBS, check_param_counts, configs, parse_knobs, write_ablation_report
from fewsound.cli import ArgumentParser, positive_int
from fewsound.errors import FewsoundError, Stopped
from fewsound.plan import FitTask
from tune.jobs import add_common_arguments, corpus_clips, parse_list, print_summary, resolve_corpus

LENGTHS = {"1.5": 32_768, "3": 65_536}
SMOKE_LENGTH = 16_384
SMOKE_METRICS = ("mse", "psnr", "lsd", "si_snr", "pesq", "stoi", "wd_hf")


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--knobs", default=None, help=f"comma-separated knobs to vary (default: all: {','.join(KNOBS)})")
    p.add_argument(
        "--lengths",
        default="1.5,3",
        help="clip lengths in seconds: 1.5 (32,768 samples) and/or 3 (65,536) (default: 1.5,3)",
    )
    p.add_argument(
        "--steps", type=positive_int, default=10_000, help="optimizer steps per fit (default: 10,000, the paper)"
    )
    p.add_argument("--kind", default="speech", help="which clips of the corpus (default: speech, as the paper)")
    add_common_arguments(p)
    p.set_defaults(clips="10")  # the paper: 10 clips
    # the shared options, as this job reads them: the rate is a knob here, and the clip count defaults to 10
    p._option_string_actions["--lr"].help = argparse.SUPPRESS
    p._option_string_actions["--clips"].help = (
        "how many clips (a number: the first N of the corpus) or a "
        "comma-separated list of clip ids (default: 10, the paper's)"
    )
    args = p.parse_args(argv)
    if args.lr is not None:
        print("error: --lr: the learning rate is a knob of this ablation (--knobs lr), not an option", file=sys.stderr)
        return 2
    if args.smoke_test:
        args.knobs, args.steps, args.clips = args.knobs or "scale_spline", 3, "1"
        args.experiment = args.experiment or "kan_ablation-smoke"
    # the smoke test: 0.74 s crops and no CDPAM (a neural metric, seconds per fit on a CPU)
    metrics = SMOKE_METRICS if args.smoke_test else None
    try:
        knobs = parse_knobs(args.knobs)
        lengths = [LENGTHS[x] for x in parse_list(args.lengths, LENGTHS, "--lengths")]
        lengths = [SMOKE_LENGTH] if args.smoke_test else lengths
        mismatches = check_param_counts(knobs)
        for m in mismatches:
            print(f"warning: parameter count differs from the paper: {m}", file=sys.stderr)
        corpus = resolve_corpus(args.corpus, max(lengths))
        clips = corpus_clips(corpus, args.clips, args.kind)
        tasks = [
            FitTask(cfg, c.clip_id, c.kind, n, label)
            for n in lengths
            for label, cfg in configs(knobs, args.steps, args.seed).items()
            for c in clips
        ]
        print(
            f"[kan_ablation] knobs {', '.join(k.name for k in knobs)}: {len(tasks) // (len(clips) * len(lengths))} "
            f"distinct configurations x {len(clips)} clips x {len(lengths)} lengths; parameter counts "
            + ("match the paper" if not mismatches else f"differ from the paper in {len(mismatches)} rows")
        )
        from tune.jobs import sweep_options
        from tune.sweep import run_sweep

        summary = run_sweep(
            "kan_ablation",
            tasks,
            corpus=corpus,
            **sweep_options(args),
            metrics=metrics,
            table={"title": "KAN ablation: every configuration", "row_header": "configuration"},
        )
        summary.table_markdown = log_knob_tables(summary, knobs)
    except FewsoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # SIGINT/SIGTERM: the trials were stopped, what finished is kept
        print(e, file=sys.stderr)
        return e.exit_code
    print_summary(summary)
    return 0 if summary.failed == 0 else 1


def log_knob_tables(summary, knobs) -> str:
    """One table per knob and the quality-vs-params plot, logged to the sweep's parent run. Returns the Markdown."""
    from pathlib import Path

    from fewsound.tracking import MlflowRun

    parent = MlflowRun(summary.experiment, uri=summary.tracking_uri, run_id=summary.parent_run_id)
    with tempfile.TemporaryDirectory() as d:
        paths, markdown = write_ablation_report(d, summary.rows, knobs)
        for path in paths:
            rel = Path(path).relative_to(d)
            parent.log_artifact(path, str(Path("tables") / rel.parent) if rel.suffix != ".png" else "plots")
    return markdown


if __name__ == "__main__":
    raise SystemExit(main())
