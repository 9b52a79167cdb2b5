"""Hyper-parameter search of INR families under a parameter budget: Optuna TPE (through Ray Tune) with ASHA,
starting from the paper's configuration, resumable.

    python jobs/search_inr.py --family kan --max-params 34000 --trials 200 --objective pesq
    python jobs/search_inr.py --family any --max-params 34000 --trials 300        # the best INR of any family
    python jobs/search_inr.py --family kan --start-from grid_size=16,widths=64x32x16 --trials 100
    python jobs/search_inr.py --family kan --trials 30 --steps 100 --clips 2 --length 0.75 --validate-top 3
    python jobs/search_inr.py --smoke-test

The paper's configuration of each family (and every --start-from configuration) is fitted first, as a trial that
ASHA never stops, so the best reported is never below it. Under --max-params the sampler draws parameter targets
between half the budget and the budget and derives the widths (suggestions still over it are never fitted).
Each trial fits one configuration on a small pack of clips and reports the objective after every chunk of steps;
ASHA stops the poor ones. The study lives in the sweep's storage ($FEWSOUND_STORAGE or $FEWSOUND_HOME): running
the same command again after an interruption continues it. Results: one MLflow parent run (comparison, every
trial, importances, plots, the listening page report/listen.html), one child run per trial.

Held-out validation (--validate, or any --validate-* option): after the trials, every start point and the
--validate-top best trials are refitted on clips no trial used (the same corpus minus the searched clips and
their recordings; on the built-in corpus its 10-clips-per-voice protocol, builtin:inr-1.5s-x10, for more clips;
or --validate-corpus), at the search's steps and length or --validate-steps/--validate-length, as child runs
of the search's parent (a re-run skips finished refits). The output ends with each configuration's mean and 95%
interval per metric, a Wilcoxon signed-rank test of each against the paper's configuration on the same clips
(Holm-corrected), and the verdict: whether the winner beats the paper's configuration on held-out clips.
"""

from __future__ import annotations

import argparse
import sys

from fewsound.cli import ArgumentParser, positive_int
from fewsound.errors import ConfigError, FewsoundError, Stopped
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

LENGTHS = {"0.75": 16_384, "1.5": 32_768, "3": 65_536}  # 16,384 samples: quick searches
SMOKE_LENGTH = 16_384  # 0.74 s crops: the smoke test's fits cost half as much


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--family", default="kan", help=f"{', '.join(SPACES)}, a list (kan,siren) or any (default: kan)")
    add("--start-from", action="append", default=[], metavar="KEY=VALUE,...|FILE.json",
        help="also start from this configuration: overrides of a family's paper configuration, e.g. family=kan,"
        "grid_size=16,widths=64x32x16,lr=0.004, or a JSON file of such objects (repeatable)")  # fmt: skip
    add("--trials", type=positive_int, default=200, help="configurations fitted, start points included (default: 200)")
    add("--max-params", type=positive_int, default=None, help="parameter budget (default: none)")
    add("--objective", default="pesq", help=f"{'|'.join(MODES)}, mean over the clips; lsd is minimised (default: pesq)")
    add("--mix-weights", default=None, help=f"weights of --objective mix over {', '.join(NORMALIZE)} "
        "(default: pesq=0.5,lsd=0.25,si_snr=0.25)")  # fmt: skip
    add("--steps", type=positive_int, default=2000, help="optimizer steps per trial (default: 2,000)")
    add(
        "--chunks",
        type=positive_int,
        default=10,
        help="objective reports (ASHA's decision points) per trial (default: 10)",
    )
    add(
        "--grace-chunks",
        type=positive_int,
        default=2,
        help="chunks every trial runs before ASHA may stop it (default: 2)",
    )
    add("--reduction-factor", type=int, default=3, help="ASHA keeps 1/this at each rung (default: 3)")
    add("--clips", default="3", help="clips every trial fits: a number (the first N) or clip ids (default: 3)")
    add("--length", default="1.5", choices=sorted(LENGTHS), help="clip length in seconds (default 1.5)")
    add("--kind", default="speech", help="which clips of the corpus (default: speech; PESQ/STOI: speech only)")
    add("--corpus", default=None, help="a prepared corpus folder or URI (default: the built-in corpus)")
    add(
        "--final-metrics",
        default=",".join(FINAL_METRICS),
        help="metrics at the end of each trial (add cdpam at a cost)",
    )
    add("--seed", type=int, default=0, help="seed of the fits and of the TPE sampler (another seed: another study)")
    add("--concurrency", type=positive_int, default=None, help="most trials at once (default: what the cluster allows)")
    add("--gpu-fraction", type=float, default=0.25, help="GPU share of a trial where there are GPUs (default: 0.25)")
    add("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local Ray)")
    add("--experiment", default=None, help="MLflow experiment (default: search_inr-<family>)")
    add("--listen-clips", type=int, default=None, help="clips on the listening page (default: up to 4; 0: none)")
    add("--smoke-test", action="store_true", help="6 trials (unless --trials) of 8 steps on a 0.74 s clip: a minute")
    _add_validation_arguments(p)
    args = p.parse_args(argv)
    if args.smoke_test:
        args.steps, args.chunks, args.clips = 8, 4, "1"
        args.trials = 6 if args.trials == p.get_default("trials") else args.trials
        args.grace_chunks, args.reduction_factor, args.concurrency = 1, 2, args.concurrency or 2
        args.max_params = args.max_params or 34_000
        args.objective, args.final_metrics = "psnr", "mse,psnr,lsd,si_snr"
        args.experiment = args.experiment or f"search_inr-{args.family.replace(',', '+')}-smoke"
    try:
        from tune.search import SearchSpec, run_search

        families = parse_families(args.family)
        start_from = parse_start_from(args.start_from)
        if args.objective not in MODES:
            raise ConfigError("--objective", f"unknown objective {args.objective!r}; valid: {', '.join(MODES)}")
        length = SMOKE_LENGTH if args.smoke_test else LENGTHS[args.length]
        corpus = resolve_corpus(args.corpus, length)
        clips = corpus_clips(corpus, args.clips, args.kind)
        name = args.family.replace(",", "+")
        summary = run_search(
            SearchSpec(
                families=tuple(families),
                corpus=corpus,
                clips=tuple(c.clip_id for c in clips),
                kind=clips[0].kind,
                length=length,
                steps=args.steps,
                chunks=args.chunks,
                objective=args.objective,
                weights=parse_weights(args.mix_weights),
                seed=args.seed,
                experiment=args.experiment or f"search_inr-{name}",
                final_metrics=tuple(x.strip() for x in args.final_metrics.split(",") if x.strip()),
            ),
            start_from=start_from,
            listen_clips=args.listen_clips,
            trials=args.trials,
            max_params=args.max_params,
            grace_chunks=args.grace_chunks,
            reduction_factor=args.reduction_factor,
            concurrency=args.concurrency,
            address=args.address,
            gpu_fraction=args.gpu_fraction,
            validate=_validation(args, length),
        )
    except FewsoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # SIGINT/SIGTERM: the study keeps every ended trial
        print(e, file=sys.stderr)
        return e.exit_code
    print()
    print(summary.comparison_markdown)
    print(f"search took {summary.seconds:.1f} s")
    print(f"MLflow UI: {summary.ui_url}  (experiment {summary.experiment!r}, parent run {summary.parent_run_id})")
    if summary.heldout is not None:
        _print_heldout(summary.heldout)
    return 0 if summary.best else 1


def _add_validation_arguments(p: argparse.ArgumentParser) -> None:
    add = p.add_argument
    add("--validate", action="store_true", help="refit the best trials and the start points on held-out clips")
    add(
        "--validate-top",
        type=int,
        default=None,
        metavar="K",
        help="best trials refitted on held-out clips beside the start points (default 3; implies --validate)",
    )
    add("--validate-corpus", default=None, help="held-out clips from this corpus (folder, URI, builtin:<protocol>; "
        "default: the search's corpus; the built-in corpus: builtin:inr-1.5s-x10)")  # fmt: skip
    add("--validate-clips", type=positive_int, default=None, help="held-out clips (default: every one)")
    add("--validate-steps", type=positive_int, default=None, help="steps of the refits (default: the search's)")
    add("--validate-length", default=None, choices=sorted(LENGTHS), help="refits' clip length in seconds (default: "
        "the search's)")  # fmt: skip
    add("--validate-seed", type=int, default=0, help="seed of the held-out clips drawn (default: 0)")
    add(
        "--validate-interval", default="t", choices=["t", "bootstrap"], help="95%% interval: t or bootstrap (default t)"
    )


def _validation(args: argparse.Namespace, length: int):
    """The held-out validation the options ask for (tune.search.heldout.HeldOut), or None."""
    from tune.search.heldout import HeldOut

    named = [args.validate_top, args.validate_corpus, args.validate_clips, args.validate_steps, args.validate_length]
    if not args.validate and all(x is None for x in named):
        return None
    if args.validate_top is not None and args.validate_top < 0:
        raise ConfigError("--validate-top", f"need >= 0; got {args.validate_top}")
    vlength = LENGTHS[args.validate_length] if args.validate_length else length
    corpus = args.validate_corpus
    if corpus is None and args.corpus is None and vlength <= LENGTHS["1.5"]:
        corpus = "builtin:inr-1.5s-x10"  # the built-in corpus cut 10 clips per voice: more held-out clips
    corpus = resolve_corpus(corpus if corpus is not None else args.corpus, vlength)
    top = 3 if args.validate_top is None else args.validate_top
    return HeldOut(top, corpus, args.validate_clips, args.validate_steps, vlength, args.validate_seed,
                   args.validate_interval)  # fmt: skip


def _print_heldout(h) -> None:
    """The held-out table and, last, the verdict in words."""
    print()
    print(f"held-out clips: {h.note}")
    if h.failed:
        print(f"{h.failed} refits failed (their runs say why)")
    if h.markdown:
        print(h.markdown)
    print(f"held-out validation on the parent run: {', '.join(h.artifacts) or 'none'}")
    print(h.verdict)


if __name__ == "__main__":
    raise SystemExit(main())
