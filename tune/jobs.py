"""What the sweep jobs (jobs/fit_inrs.py, jobs/kan_ablation.py, ...) share: options, corpus, clip choice, output."""

from __future__ import annotations

import argparse
import os
from typing import Any

from fewsound.cli import positive_int
from fewsound.errors import ConfigError, DataError

BUILTIN_PROTOCOL = {32_768: "inr-1.5s", 65_536: "inr-3s"}


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        default=None,
        help="a prepared corpus (jobs/prepare_data.py --protocol inr-3s): a folder every node sees, s3://..., "
        "gs://..., or builtin:<protocol>; default: the built-in corpus, prepared on each node under "
        "$FEWSOUND_HOME/corpora",
    )
    p.add_argument(
        "--clips",
        default=None,
        help="how many clips (a number: the first N of the corpus) or a "
        "comma-separated list of clip ids (default: every clip)",
    )
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: each family's, see fewsound.fit)")
    p.add_argument("--seed", type=int, default=0, help="base seed of every fit (default: 0)")
    p.add_argument(
        "--pack-size",
        type=positive_int,
        default=16,
        help="fits of one configuration fitted at once by the packed engine (default: 16)",
    )
    p.add_argument(
        "--trials-per-slot",
        type=int,
        default=4,
        help="packs are bundled into about this many Ray Tune "
        "trials per trial slot (trials the cluster runs at once), since each trial costs Tune a fixed "
        "overhead; 0: one trial per pack (default: 4)",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=1,
        help="refits (with a new seed) of a diverged fit before it is recorded FAILED (default: 1)",
    )
    p.add_argument(
        "--gpu-fraction",
        type=float,
        default=0.25,
        help="GPU share of one trial on a cluster with GPUs: "
        "1, 0.5, 0.25 or 0.125 (default: 0.25); trials ask for one CPU where there are no GPUs",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="most trials at once (default: as many as the cluster runs at its ceiling, FEWSOUND_MAX_GPUS/"
        "FEWSOUND_MAX_CPUS, or at its present size where no ceiling is set)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: $RAY_ADDRESS, e.g. under `ray job submit`, else a local Ray)",
    )
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: the job's name)")
    add_listen_argument(p)
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help="a few fits of a few steps on short crops, every "
        "metric and artifact: the whole path in seconds of compute on a CPU",
    )


def add_listen_argument(p: argparse.ArgumentParser) -> None:
    from fewsound.listen import LISTEN_CLIPS, LISTEN_MAX_FITS

    p.add_argument(
        "--listen-clips",
        type=int,
        default=None,
        help="clips on the sweep's listening page (report/listen.html on the parent run: every fit of each clip "
        "as audio and spectrograms beside its metrics), spread over the sweep's clips; 0: no page (default: "
        f"{LISTEN_CLIPS}, fewer where a clip has many fits, so that the page shows at most {LISTEN_MAX_FITS})",
    )


def sweep_options(args: argparse.Namespace) -> dict[str, Any]:
    """run_sweep's keyword arguments from the options that add_common_arguments defines."""
    return dict(
        experiment=args.experiment,
        pack_size=args.pack_size,
        address=args.address,
        gpu_fraction=args.gpu_fraction,
        max_retries=args.max_retries,
        trials_per_slot=args.trials_per_slot or None,
        listen_clips=args.listen_clips,
        max_concurrent=args.max_concurrent,
    )


def parse_list(text: str, valid: Any, option: str) -> list[str]:
    items = [x.strip() for x in str(text).split(",") if x.strip()]
    bad = [x for x in items if x not in valid]
    if bad or not items:
        raise ConfigError(option, f"unknown value(s) {bad or [text]}; valid: {', '.join(map(str, valid))}")
    return items


def resolve_corpus(corpus: str | None, length: int) -> str:
    """Where the sweep's trials read their clips: `corpus` (a folder every node mounts, s3://..., gs://..., or
    builtin:<protocol>) checked to store clips of `length` samples; None: the built-in corpus, by name (the
    shortest INR protocol that stores `length` samples), so each node prepares its own copy from the package."""
    from fewsound.data.builtin import builtin_name
    from fewsound.data.corpus import corpus_location, open_corpus

    if corpus is None:
        fits = [p for n, p in sorted(BUILTIN_PROTOCOL.items()) if n >= length]
        if not fits:
            raise ConfigError("length", f"{length} samples: the built-in corpus stores at most {max(BUILTIN_PROTOCOL)}")
        corpus = builtin_name(fits[0])
    c = open_corpus(corpus)  # here too the driver reads the clip list (and prepares a built-in one)
    if c.manifest["stored_length"] < length:
        raise DataError(
            corpus,
            f"stores {c.manifest['stored_length']}-sample clips, the sweep needs {length} "
            "(prepare it with --protocol inr-3s)",
        )
    return corpus_location(corpus)


def corpus_clips(corpus: str, clips: str | None, kind: str) -> list[Any]:
    """The corpus's clips of `kind` ('all' for every kind), narrowed by --clips (a count or a list of ids).
    Metadata only (fewsound.data.shards.ClipInfo): the driver never reads the audio."""
    from fewsound.data.corpus import open_corpus

    every = [c for c in open_corpus(corpus).infos() if kind == "all" or c.kind == kind]
    if not every:
        raise DataError(corpus, f"has no clips of kind {kind!r}")
    if clips is None:
        return every
    if clips.isdigit():
        if int(clips) > len(every):  # e.g. the built-in Table-1 protocol holds one speech clip per voice
            print(f"note: --clips {clips}: the corpus holds {len(every)} clips of kind {kind!r}; using all of them")
        return every[: int(clips)]
    wanted = [x.strip() for x in clips.split(",") if x.strip()]
    by_id = {c.clip_id: c for c in every}
    missing = [x for x in wanted if x not in by_id]
    if missing:
        raise ConfigError("--clips", f"not in the corpus (kind {kind}): {missing}; e.g. {list(by_id)[:5]}")
    return [by_id[x] for x in wanted]


def print_summary(s: Any) -> None:
    print()
    if s.table_markdown:
        print(s.table_markdown)
    print(f"{s.n_fits} fits: {s.done} done now, {s.skipped} already finished, {s.failed} failed, in {s.seconds:.1f} s")
    if getattr(s, "replayed", 0):
        print(f"{s.replayed} of the finished fits were logged from their records in {s.records} (not refitted)")
    print(f"MLflow UI: {s.ui_url}  (experiment {s.experiment!r}, parent run {s.parent_run_id})")
    if os.environ.get("FEWSOUND_HOME") is None:
        print("browse it any time: the local MLflow server keeps running after this job")
