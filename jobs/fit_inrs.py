"""The paper's Table 1 (and Tables 18-19 with another corpus): every INR family x every clip x each clip length.

    python jobs/fit_inrs.py                       # Table 1 protocol on the built-in corpus's speech (10,000 steps)
    python jobs/fit_inrs.py --steps 300 --clips 3 # a small sweep: a few minutes on a laptop CPU
    python jobs/fit_inrs.py --corpus DIR          # a corpus prepared by jobs/prepare_data.py (--protocol inr-3s)
    ray job submit --working-dir . -- python jobs/fit_inrs.py --corpus /shared/vctk-inr-3s

Re-running the same command skips every fit already finished in MLflow. Results: one MLflow parent run per
sweep, one child run per fit (metrics, audio/gt.wav, audio/pred.wav, plots/spectrogram.png), the table on the
parent run and printed at the end.
"""

from __future__ import annotations

import argparse
import sys

from fewsound.cli import ArgumentParser, positive_int
from fewsound.errors import FewsoundError, Stopped
from fewsound.fit import FitConfig
from fewsound.inr import FAMILIES
from fewsound.plan import FitTask
from tune.jobs import add_common_arguments, corpus_clips, parse_list, print_summary, resolve_corpus

PAPER_LABELS = {"nerf": "NERF", "siren": "SIREN", "finer": "FINER", "wire": "WIRE", "rff": "RFF", "kan": "KAN"}
LENGTHS = {"1.5": 32_768, "3": 65_536}
# --smoke-test: 0.74 s crops (long enough for STOI's 384 ms of speech) and a few steps, so that the whole path
# (fit, every metric including CDPAM, audio, spectrogram, tables) takes seconds of compute on a CPU
SMOKE_LENGTH, SMOKE_STEPS = 16_384, 5


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--families",
        default=",".join(FAMILIES),
        help=f"comma-separated INR families (default: all: {','.join(FAMILIES)})",
    )
    p.add_argument(
        "--lengths",
        default="1.5,3",
        help="clip lengths in seconds: 1.5 (32,768 samples) and/or 3 (65,536) (default: 1.5,3)",
    )
    p.add_argument(
        "--steps", type=positive_int, default=10_000, help="optimizer steps per fit (default: 10,000, the paper)"
    )
    p.add_argument(
        "--kind",
        default="speech",
        help="which clips of the corpus: speech (Table 1), music (Table "
        "18, GTZAN), environment (Table 19, UrbanSound8K), or all (default: speech)",
    )
    add_common_arguments(p)
    args = p.parse_args(argv)
    try:
        families = parse_list(args.families, FAMILIES, "--families")
        lengths = [LENGTHS[x] for x in parse_list(args.lengths, LENGTHS, "--lengths")]
        if args.smoke_test:  # the whole path (fit, every metric, audio, spectrogram, tables) on tiny work
            families, lengths, args.steps = ["nerf", "kan"], [SMOKE_LENGTH], SMOKE_STEPS
            args.clips = args.clips or "3"
            args.experiment = args.experiment or "fit_inrs-smoke"
        corpus = resolve_corpus(args.corpus, max(lengths))
        clips = corpus_clips(corpus, args.clips, args.kind)
        # each family's default config is its Table 1 configuration
        tasks = [
            FitTask(
                FitConfig(family=f, steps=args.steps, seed=args.seed, lr=args.lr), c.clip_id, c.kind, n, PAPER_LABELS[f]
            )
            for n in lengths
            for f in families
            for c in clips
        ]
        from tune.jobs import sweep_options
        from tune.sweep import run_sweep

        summary = run_sweep(
            "fit_inrs",
            tasks,
            corpus=corpus,
            **sweep_options(args),
            table={
                "title": "Table 1: reconstruction metrics of single-INR fits",
                "paper_table": None
                if args.smoke_test
                else {"speech": 1, "music": 18, "environment": 19}.get(args.kind),
                "label_order": [PAPER_LABELS[f] for f in families],
            },
        )
    except FewsoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # SIGINT/SIGTERM: the trials were stopped, what finished is kept
        print(e, file=sys.stderr)
        return e.exit_code
    print_summary(summary)
    return 0 if summary.failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
