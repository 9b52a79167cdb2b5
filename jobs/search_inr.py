"""Hyper-parameter search of INR families under a parameter budget: Optuna TPE (through Ray Tune) with ASHA,
starting from the paper's configuration, resumable.

    python jobs/search_inr.py --family kan --max-params 34000 --trials 200 --objective pesq
    python jobs/search_inr.py --family any --max-params 34000 --trials 300        # the best INR of any family
    python jobs/search_inr.py --family kan --start-from grid_size=16,widths=64x32x16 --trials 100
    python jobs/search_inr.py --smoke-test

The paper's configuration of each family (and every --start-from configuration) is fitted first, as a trial that
ASHA never stops, so the best reported is never below it. Under --max-params the sampler draws parameter targets
between half the budget and the budget and derives the widths (suggestions still over it are never fitted).
Each trial fits one configuration on a small pack of clips and reports the objective after every chunk of steps;
ASHA stops the poor ones. The study lives in the sweep's storage ($FEWSOUND_STORAGE or $FEWSOUND_HOME): running
the same command again after an interruption continues it. Results: one MLflow parent run (comparison, every
trial, importances, plots, the listening page report/listen.html), one child run per trial.
"""

from __future__ import annotations

import argparse
import sys

from fewsound.errors import ConfigError, FewsoundError
from fewsound.search_space import (
    FINAL_METRICS,
    MODES,
    NORMALIZE,
    SPACES,
    parse_families,
    parse_start_from,
    parse_weights,
)
from tune.jobs import corpus_clips, resolve_corpus

LENGTHS = {"1.5": 32_768, "3": 65_536}
SMOKE_LENGTH = 16_384  # 0.74 s crops: the smoke test's fits cost half as much


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--family",
        default="kan",
        help=f"INR family to tune: {', '.join(SPACES)}, a comma-separated list, or any (all; the family becomes a "
        "searched parameter) (default: kan)",
    )
    p.add_argument(
        "--start-from",
        action="append",
        default=[],
        metavar="KEY=VALUE,...|FILE.json",
        help="also start from this configuration (overrides of a family's paper configuration, e.g. "
        "family=kan,grid_size=16,widths=64x32x16,lr=0.004; or a JSON file of such objects); repeatable",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=200,
        help="configurations fitted (Ray trials; rejected over-budget suggestions do not count) (default: 200)",
    )
    p.add_argument(
        "--max-params",
        type=int,
        default=None,
        help="parameter budget: suggestions with more parameters are never fitted (default: no budget)",
    )
    p.add_argument(
        "--objective",
        default="pesq",
        help=f"what to optimise: {'|'.join(MODES)} (mean over the "
        "clips; lsd is minimised, the others maximised) (default: pesq)",
    )
    p.add_argument(
        "--mix-weights",
        default=None,
        help="weights of --objective mix over normalised metrics "
        f"({', '.join(NORMALIZE)}), e.g. pesq=0.5,lsd=0.25,si_snr=0.25 (the default)",
    )
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per trial (default: 2,000)")
    p.add_argument(
        "--chunks",
        type=int,
        default=10,
        help="the objective is reported after each of this many "
        "equal chunks of steps; ASHA decides at these points (default: 10)",
    )
    p.add_argument(
        "--grace-chunks", type=int, default=2, help="chunks every trial runs before ASHA may stop it (default: 2)"
    )
    p.add_argument("--reduction-factor", type=int, default=3, help="ASHA keeps 1/this at each rung (default: 3)")
    p.add_argument(
        "--clips",
        default="3",
        help="clips of the pack every trial fits: a number (the first N) or comma-separated clip ids (default: 3)",
    )
    p.add_argument("--length", default="1.5", choices=sorted(LENGTHS), help="clip length in seconds (default 1.5)")
    p.add_argument(
        "--kind", default="speech", help="which clips of the corpus (default: speech; PESQ/STOI apply to speech only)"
    )
    p.add_argument("--corpus", default=None, help="a prepared corpus folder (default: the built-in corpus)")
    p.add_argument(
        "--final-metrics",
        default=",".join(FINAL_METRICS),
        help=f"metrics logged at the end of each trial (default: {','.join(FINAL_METRICS)}; add cdpam at a cost)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fits and of the TPE sampler (default: 0)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="most trials at once (default: as many as the cluster's resources allow)",
    )
    p.add_argument(
        "--gpu-fraction",
        type=float,
        default=0.25,
        help="GPU share of a trial on a cluster with GPUs (1, 0.5, 0.25, 0.125; default: 0.25); one CPU otherwise",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local Ray)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: search_inr-<family>)")
    p.add_argument(
        "--listen-clips", type=int, default=None, help="clips on the listening page (default: up to 4; 0: no page)"
    )
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help="6 trials (unless --trials) of 8 steps on one 0.74 s clip, PSNR objective, budget 34,000: a minute",
    )
    args = p.parse_args(argv)
    if args.smoke_test:
        args.steps, args.chunks, args.clips = 8, 4, "1"
        args.trials = 6 if args.trials == p.get_default("trials") else args.trials
        args.grace_chunks, args.reduction_factor, args.concurrency = 1, 2, args.concurrency or 2
        args.max_params = args.max_params or 34_000
        args.objective, args.final_metrics = "psnr", "mse,psnr,lsd,si_snr"
        args.experiment = args.experiment or f"search_inr-{args.family.replace(',', '+')}-smoke"
    try:
        from tune.search import run_search

        families = parse_families(args.family)
        start_from = parse_start_from(args.start_from)
        if args.objective not in MODES:
            raise ConfigError("--objective", f"unknown objective {args.objective!r}; valid: {', '.join(MODES)}")
        length = SMOKE_LENGTH if args.smoke_test else LENGTHS[args.length]
        corpus = resolve_corpus(args.corpus, length)
        clips = corpus_clips(corpus, args.clips, args.kind)
        name = args.family.replace(",", "+")
        summary = run_search(
            {
                "families": tuple(families),
                "corpus": corpus,
                "clips": tuple(c.clip_id for c in clips),
                "kind": clips[0].kind,
                "length": length,
                "steps": args.steps,
                "chunks": args.chunks,
                "objective": args.objective,
                "weights": parse_weights(args.mix_weights),
                "seed": args.seed,
                "experiment": args.experiment or f"search_inr-{name}",
                "final_metrics": tuple(x.strip() for x in args.final_metrics.split(",") if x.strip()),
            },
            start_from=start_from,
            listen_clips=args.listen_clips,
            trials=args.trials,
            max_params=args.max_params,
            grace_chunks=args.grace_chunks,
            reduction_factor=args.reduction_factor,
            concurrency=args.concurrency,
            address=args.address,
            gpu_fraction=args.gpu_fraction,
        )
    except FewsoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(summary.comparison_markdown)
    print(f"search took {summary.seconds:.1f} s")
    print(f"MLflow UI: {summary.ui_url}  (experiment {summary.experiment!r}, parent run {summary.parent_run_id})")
    return 0 if summary.best else 1


if __name__ == "__main__":
    raise SystemExit(main())
