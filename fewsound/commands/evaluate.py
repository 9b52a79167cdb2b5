"""`python -m fewsound evaluate REF REC`: the paper's metrics between reference and reconstruction, as JSON.

REF and REC are two audio files, or two folders: then every audio file in REF is paired with the file of the
same name in REC (a missing or extra match is an error). Both sides are read at their own rate and resampled to
--sr (22,050 Hz, the paper's rate) so that all metrics see the paper's setting.

Output: a JSON object `{name: {metric: value, ..., "not_applicable": {metric: reason}}}` (one key per file name).
Strict JSON: a perfect reconstruction's PSNR/SNR/SI-SNR (+inf) is written as the string "inf".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fewsound.errors import AudioError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fewsound.metrics import EXTRA_METRICS, KINDS, METRICS

    parser.add_argument("ref", type=Path, help="reference audio file, or a folder of them")
    parser.add_argument("rec", type=Path, help="reconstruction audio file, or a folder with the same file names")
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="speech",
        help="what the audio is; PESQ/STOI/CDPAM apply to clean speech only (default: speech)",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        choices=METRICS + EXTRA_METRICS,
        default=None,
        metavar="NAME",
        help=f"metrics to compute (default: {' '.join(METRICS)}; also {' '.join(EXTRA_METRICS)})",
    )
    parser.add_argument("--sr", type=int, default=22_050, help="evaluation sample rate (default: 22050)")
    parser.add_argument("--workers", type=int, default=0, help="processes for PESQ/STOI (default: in-process)")
    parser.add_argument("--device", default=None, help="torch device for CDPAM (default: cuda when present)")


def pair_files(ref: Path, rec: Path) -> list[tuple[str, Path, Path]]:
    """(name, ref_path, rec_path) for a file pair or a folder pair matched by file name."""
    if ref.is_dir() != rec.is_dir() and ref.exists() and rec.exists():
        raise AudioError(rec if ref.is_dir() else ref, "give two files or two folders, not one of each")
    if not ref.is_dir():
        return [(ref.name, ref, rec)]
    if not rec.is_dir():
        raise AudioError(rec, "no such folder")
    refs = {p.name: p for p in sorted(ref.iterdir()) if p.suffix.lower() in AUDIO_SUFFIXES}
    recs = {p.name: p for p in sorted(rec.iterdir()) if p.suffix.lower() in AUDIO_SUFFIXES}
    if not refs:
        raise AudioError(ref, "folder holds no audio files")
    for name in refs.keys() - recs.keys():
        raise AudioError(rec / name, f"missing: no reconstruction matches reference {ref / name}")
    for name in recs.keys() - refs.keys():
        raise AudioError(rec / name, f"has no reference {ref / name}")
    return [(name, refs[name], recs[name]) for name in sorted(refs)]


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "-inf" if v < 0 else "nan"
    return v


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from fewsound.data.audio import load_audio
    from fewsound.metrics import evaluate

    pairs = pair_files(args.ref, args.rec)
    loaded = []
    for name, ref_path, rec_path in pairs:
        x, y = load_audio(ref_path, sr=args.sr), load_audio(rec_path, sr=args.sr)
        if x.shape != y.shape:
            raise AudioError(
                rec_path,
                f"length {y.shape[-1]} differs from the reference {ref_path} ({x.shape[-1]} samples at {args.sr} Hz)",
            )
        loaded.append((name, x, y, rec_path))
    results = {}
    # Clips of one length are evaluated as one batch (what evaluate() batches); folders may mix lengths.
    for n in sorted({x.shape[-1] for _, x, _, _ in loaded}):
        group = [item for item in loaded if item[1].shape[-1] == n]
        rows = evaluate(
            np.stack([g[1] for g in group]),
            np.stack([g[2] for g in group]),
            args.sr,
            kind=args.kind,
            metrics=args.metrics,
            device=args.device,
            workers=args.workers,
            names=[str(g[3]) for g in group],
        )
        for (name, *_), row in zip(group, rows):
            results[name] = {k: _json_value(v) for k, v in row.items()}
    json.dump({name: results[name] for name, *_ in pairs}, sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")
    return 0
