"""The built-in corpus shipped inside the package: real recorded speech, music and environmental sound.

A few MB of FLAC under `fewsound/data/builtin/` (package data) so that every job, test and smoke run works
offline. `manifest.json` there records each clip's provenance, licence and checksum; `ATTRIBUTION.md` the
credits. `scripts/build_builtin_corpus.py` rebuilds it from Debian packages.

    >>> clips = builtin_corpus()
    >>> speech = [c for c in clips if c.kind == "speech"]
    >>> x = speech[0].load()          # float32 [N] at 22,050 Hz

Prepared, it is a corpus like any other, addressed by name: `builtin:<protocol>` (e.g. `builtin:inr-1.5s`,
`builtin:fewsound`) is what jobs pass to their trials and workers instead of a folder. Each process that opens
the name prepares it once under its own machine's `$FEWSOUND_HOME/corpora/` from the installed package
(`fewsound.data.corpus.resolve_builtin`). Why per node rather than one upload to shared storage: the package is
on every node anyway and preparing it is deterministic (same files, same protocol and seed: bit-identical
shards), takes seconds, and needs no bucket, credentials or upload step, so the laptop and the cluster run the
same code and a node never depends on another node's disk.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import numpy as np

from fewsound.data.audio import DEFAULT_SR, load_audio
from fewsound.data.importers import KINDS as SOURCE_KINDS
from fewsound.data.importers import SourceRecord
from fewsound.errors import DataError

KINDS = ("speech", "music", "environment")
SCHEME = "builtin:"


@dataclasses.dataclass(frozen=True)
class BuiltinClip:
    """One clip of the built-in corpus (fields mirror its row in manifest.json)."""

    clip_id: str
    path: Path  # absolute
    kind: str  # one of KINDS
    speaker: str  # voice id ("en-allison") or, for music/environment, a source-derived id
    sample_rate: int  # of the stored file
    n_samples: int  # of the stored file
    licence: str
    source: str  # "<debian package> <version>"
    gender: str | None = None  # "female" / "male" for speech
    language: str | None = None  # BCP-47 tag for speech
    sha256: str = ""

    @property
    def seconds(self) -> float:
        return self.n_samples / self.sample_rate

    def load(self, sr: int | None = DEFAULT_SR) -> np.ndarray:
        """The clip as float32 mono `[N]` resampled to `sr` (None keeps the stored rate)."""
        return load_audio(self.path, sr=sr)


def builtin_root() -> Path:
    """The folder holding the corpus files, manifest.json and ATTRIBUTION.md."""
    return Path(__file__).resolve().parent / "builtin"


def builtin_manifest() -> dict:
    """manifest.json as a dict (raises DataError when the package data is missing or malformed)."""
    path = builtin_root() / "manifest.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, "built-in corpus manifest missing (package data not installed?)") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed JSON: {e}") from None


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[BuiltinClip, ...]:
    root = builtin_root()
    clips = []
    for row in builtin_manifest()["clips"]:
        try:
            clip = BuiltinClip(
                clip_id=row["clip_id"],
                path=root / row["path"],
                kind=row["kind"],
                speaker=row["speaker"],
                sample_rate=int(row["sample_rate"]),
                n_samples=int(row["n_samples"]),
                licence=row["licence"],
                source=f"{row['source']['package']} {row['source']['version']}",
                gender=row.get("gender"),
                language=row.get("language"),
                sha256=row.get("sha256", ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(root / "manifest.json", f"bad clip row {row.get('clip_id', '?')}: {e!r}") from None
        if clip.kind not in KINDS:
            raise DataError(root / "manifest.json", f"clip {clip.clip_id}: unknown kind {clip.kind!r}")
        clips.append(clip)
    return tuple(sorted(clips, key=lambda c: (c.kind, c.speaker, c.clip_id)))


def builtin_corpus(kind: str | None = None) -> list[BuiltinClip]:
    """All clips (or those of one `kind`), sorted by (kind, speaker, clip_id) - a stable order."""
    if kind is not None and kind not in KINDS:
        raise DataError("builtin_corpus(kind=...)", f"unknown kind {kind!r}, expected one of {KINDS}")
    return [c for c in _corpus() if kind is None or c.kind == kind]


def builtin_name(protocol: str) -> str:
    """The name that stands for the built-in corpus prepared with `protocol` (e.g. "builtin:inr-1.5s")."""
    return f"{SCHEME}{protocol}"


def builtin_records() -> list[SourceRecord]:
    """The built-in corpus shipped inside the package as source records (`--source builtin`)."""
    clips = builtin_corpus()
    if not clips:
        raise DataError("builtin", "the built-in corpus is empty")
    # the deepest folder holding every clip, so `rel` stays short and portable
    common = Path(os.path.commonpath([str(Path(c.path).resolve().parent) for c in clips]))
    out = []
    for c in clips:
        p = Path(c.path).resolve()
        kind = c.kind if c.kind in SOURCE_KINDS else "other"
        out.append(
            SourceRecord(path=str(p), rel=p.relative_to(common).as_posix(), utterance=str(c.clip_id),
                         speaker=str(c.speaker), group=str(c.speaker), kind=kind)
        )  # fmt: skip
    return out
