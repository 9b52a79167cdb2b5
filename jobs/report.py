"""Regenerate the paper's tables and figures from the MLflow runs of a sweep (fit_inrs, kan_ablation, search_inr).

    python jobs/report.py --experiment fit_inrs --out report/      # the experiment's latest sweep
    python jobs/report.py --run-id 2dded...  --out report/          # one sweep, by its parent run id
    python jobs/report.py --smoke-test                              # a tiny sweep (seconds), then its report

Writes into --out: table.md / table.tex / table.csv / results.csv (mean ± std per family, or per ablation value,
for MSE, PSNR, LSD, SI-SNR, PESQ, STOI, CDPAM and WD; best in bold; the paper's numbers in parentheses where
the protocol matches), one folder of tables per knob and quality_vs_params.png for a KAN ablation, and
spectrograms.png: ground truth and every row's reconstruction of one clip (the paper's Fig. 3), from the child
runs' audio (audio/pred.flac, and the target each run names on its parent run); and listen.html, the listening
page (also logged on the parent run as report/listen.html): for --listen-clips clips, the target and every row's
reconstruction as playable audio with spectrograms (target | prediction | difference) and metrics side by side,
self-contained (works offline).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fewsound.cli import ArgumentParser
from fewsound.errors import ConfigError, FewsoundError
from tune.jobs import add_listen_argument


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", default=None, help="the sweep's MLflow parent run id")
    p.add_argument("--experiment", default=None, help="MLflow experiment: report its latest sweep (when no --run-id)")
    p.add_argument("--out", default=None, help="output folder (default: ./report-<parent run id>)")
    p.add_argument(
        "--clip",
        default=None,
        help="clip id of the spectrogram comparison (default: the first clip every row has, at the shortest length)",
    )
    p.add_argument(
        "--max-spectrograms",
        type=int,
        default=8,
        help="most reconstructions in the spectrogram comparison (default: 8)",
    )
    add_listen_argument(p)
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help="run a tiny sweep (nerf and kan, one 0.74 s clip, 3 steps, no CDPAM) and report it: seconds on a CPU",
    )
    args = p.parse_args(argv)
    try:
        from fewsound.tracking import tracking_uri, ui_url
        from tune.report import collect, latest_parent, write_report

        uri = tracking_uri()
        if args.smoke_test and not args.run_id:
            args.run_id = _smoke_sweep()
        if not args.run_id and not args.experiment:
            raise ConfigError("--run-id/--experiment", "name the sweep: a parent run id or an experiment")
        run_id = args.run_id or latest_parent(uri, args.experiment)
        parent, rows = collect(uri, run_id)
        out = Path(args.out or f"report-{run_id[:8]}")
        paths, markdown = write_report(
            uri,
            parent,
            rows,
            out,
            clip=args.clip,
            max_spectrograms=args.max_spectrograms,
            listen_clips=args.listen_clips,
        )
    except FewsoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown)
    print(
        f"{len(rows)} finished fits of sweep {parent.data.tags.get('fewsound.sweep', run_id)} "
        f"({parent.data.tags.get('fewsound.job', '?')}); wrote {len(paths)} files to {out}/:"
    )
    for path in paths:
        print(f"  {path}")
    print(f"MLflow UI: {ui_url(uri, parent.info.experiment_id, run_id)}")
    return 0


def _smoke_sweep() -> str:
    from fewsound.fit import FitConfig
    from fewsound.plan import FitTask
    from tune.jobs import corpus_clips, resolve_corpus
    from tune.sweep import run_sweep

    length = 16_384  # 0.74 s: enough for STOI; every metric but CDPAM (seconds per fit on a CPU)
    corpus = resolve_corpus(None, length)
    clip = corpus_clips(corpus, "1", "speech")[0]
    tasks = [FitTask(FitConfig(family=f, steps=3), clip.clip_id, clip.kind, length, f.upper()) for f in ("nerf", "kan")]
    return run_sweep(
        "fit_inrs",
        tasks,
        corpus=corpus,
        experiment="report-smoke",
        progress=False,
        metrics=("mse", "psnr", "lsd", "si_snr", "pesq", "stoi", "wd_hf"),
        table={"title": "smoke sweep", "label_order": ["NERF", "KAN"]},
    ).parent_run_id


if __name__ == "__main__":
    raise SystemExit(main())
