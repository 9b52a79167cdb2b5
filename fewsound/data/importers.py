"""Dataset importers: a folder in a known layout -> a sorted list of `SourceRecord`s (one per audio file).

An importer only walks the tree and reads small metadata files (csv); it never decodes audio, so scanning a
corpus of 100k files takes seconds. Decoding, validation and rejection happen later, per shard
(`fewsound.data.shards.process_shard`).

Every record names its `group`: the unit a protocol selects from and splits on. It is the speaker for speech
(VCTK, LibriSpeech), the book for LJ Speech (a single voice), the genre for GTZAN and the fold for UrbanSound8K
(the paper's appendix picks "10 samples per genre" / "10 samples per split").

    IMPORTERS["vctk"](root) -> [SourceRecord, ...]
    scan(root, layout="auto") -> (layout, records)
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

from fewsound.data.audio import AUDIO_SUFFIXES
from fewsound.errors import DataError

# kinds of sound; metrics that only make sense for clean speech (PESQ, STOI, CDPAM) check kind == "speech"
KINDS = ("speech", "noisy_speech", "music", "environment", "other")


@dataclasses.dataclass(frozen=True)
class SourceRecord:
    """One input audio file and what the layout says about it (nothing here comes from decoding it)."""

    path: str  # absolute path of the file
    rel: str  # path relative to the source root (what manifests and error lists show)
    utterance: str  # stable id inside the source, unique per file (e.g. "p225_001_mic1")
    speaker: str  # who or what produced the sound (speaker id, "LJ", genre, freesound source id)
    group: str  # the unit protocols select from and split on (see the module docstring)
    kind: str  # one of KINDS
    label: str = ""  # class or genre when the layout has one
    split: str = ""  # split the layout itself defines ("train"/"validation"), "" when it defines none
    pair: str = ""  # noisy VCTK: relative path of the clean twin of this noisy file

    def __post_init__(self):
        assert self.kind in KINDS, self.kind
        assert self.split in ("", "train", "validation"), self.split


def natural_key(s: str) -> list:
    """Sort key that orders "fold2" before "fold10" (and "p225" before "s5", like a plain sort)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _audio_files(root: Path, pattern: str = "**/*") -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


def _record(root: Path, path: Path, **fields) -> SourceRecord:
    return SourceRecord(path=str(path.resolve()), rel=path.relative_to(root).as_posix(), **fields)


def _find(root: Path, name: str) -> Path | None:
    """`root/name` or `root/*/name` (users point at the corpus folder or at the folder that holds it)."""
    for cand in [root / name, *sorted(root.glob(f"*/{name}"))]:
        if cand.exists():
            return cand
    return None


# --------------------------------------------------------------------------------------------- layouts
def import_vctk(root: Path) -> list[SourceRecord]:
    """VCTK 0.92: `wav48_silence_trimmed/<speaker>/<speaker>_<nnn>_mic{1,2}.flac`; both mics (as the paper)."""
    base = root if root.name == "wav48_silence_trimmed" else _find(root, "wav48_silence_trimmed")
    if base is None:
        raise DataError(root, "not a VCTK 0.92 tree: no wav48_silence_trimmed/ folder")
    return [
        _record(root, f, utterance=f.stem, speaker=f.parent.name, group=f.parent.name, kind="speech")
        for f in _audio_files(base, "*/*")
    ]


def _noisy_vctk_dirs(root: Path) -> list[tuple[Path, Path | None]]:
    """(noisy folder, its clean folder or None) pairs: `noisy_testset_wav` <-> `clean_testset_wav`."""
    pairs = []
    for noisy in sorted([*root.glob("noisy*"), *root.glob("*/noisy*")]):
        if noisy.is_dir():
            clean = noisy.with_name("clean" + noisy.name[len("noisy") :])
            pairs.append((noisy, clean if clean.is_dir() else None))
    return pairs


def import_noisy_vctk(root: Path) -> list[SourceRecord]:
    """Noisy VCTK (Valentini-Botinhao 2016): `noisy_{train,test}set*_wav/p232_001.wav` (+ `clean_*` twins).

    The noisy files are the clips (kind noisy_speech); the clean twin is kept as `pair`. Folders named *train*
    / *test* define the split.
    """
    pairs = _noisy_vctk_dirs(root)
    if not pairs:
        raise DataError(root, "not a noisy VCTK tree: no noisy*_wav/ folder beside a clean*_wav/ one")
    out = []
    for noisy, clean in pairs:
        split = "train" if "train" in noisy.name else "validation" if "test" in noisy.name else ""
        for f in _audio_files(noisy, "*"):
            twin = clean / f.name if clean is not None else None
            speaker = f.stem.split("_")[0]
            out.append(
                _record(
                    root, f, utterance=f"{f.stem}_{noisy.name}", speaker=speaker, group=speaker,
                    kind="noisy_speech", split=split,
                    pair=twin.relative_to(root).as_posix() if twin is not None and twin.exists() else "",
                )
            )  # fmt: skip
    return out


_LIBRI_SPLIT = re.compile(r"^(train|dev|test)-(clean|other)(-\d+)?$")


def import_librispeech(root: Path) -> list[SourceRecord]:
    """LibriSpeech: `<split>/<speaker>/<chapter>/<speaker>-<chapter>-<nnnn>.flac`.

    train-* folders are the training split, dev-*/test-* the validation split (the paper trains on
    train-clean-100 and validates on test-other).
    """
    splits = [
        d for d in sorted([root, *root.glob("*"), *root.glob("*/*")]) if d.is_dir() and _LIBRI_SPLIT.match(d.name)
    ]
    if not splits:
        raise DataError(root, "not a LibriSpeech tree: no train-*/dev-*/test-* folder")
    out = []
    for d in splits:
        split = "train" if d.name.startswith("train") else "validation"
        for f in _audio_files(d, "*/*/*"):
            speaker = f.parent.parent.name
            out.append(_record(root, f, utterance=f.stem, speaker=speaker, group=speaker, kind="speech", split=split))
    return out


def import_ljspeech(root: Path) -> list[SourceRecord]:
    """LJ Speech: `wavs/LJ001-0001.wav` + `metadata.csv` (`id|text|normalized text`). One voice, so the group
    is the book (`LJ001` ... `LJ050`); files absent from metadata.csv are still imported."""
    meta = _find(root, "metadata.csv")
    base = meta.parent if meta is not None else root
    wavs = base / "wavs"
    if not wavs.is_dir():
        raise DataError(root, "not an LJ Speech tree: no wavs/ folder")
    listed: list[str] = []
    if meta is not None:
        with open(meta, encoding="utf-8", newline="") as fh:
            listed = [row[0] for row in csv.reader(fh, delimiter="|", quoting=csv.QUOTE_NONE) if row]
    files = {f.stem: f for f in _audio_files(wavs, "*")}
    order = [u for u in listed if u in files] + sorted(set(files) - set(listed))
    return [_record(root, files[u], utterance=u, speaker="LJ", group=u.split("-")[0], kind="speech") for u in order]


def import_gtzan(root: Path) -> list[SourceRecord]:
    """GTZAN: `genres_original/<genre>/<genre>.000nn.wav` (the Kaggle layout; `genres/` of the original too)."""
    base = None
    for name in ("genres_original", "genres"):
        base = root if root.name == name else _find(root, name)
        if base is not None:
            break
    if base is None:
        raise DataError(root, "not a GTZAN tree: no genres_original/ folder")
    return [
        _record(
            root, f, utterance=f.stem, speaker=f.parent.name, group=f.parent.name, kind="music", label=f.parent.name
        )
        for f in _audio_files(base, "*/*")
    ]


def import_urbansound8k(root: Path) -> list[SourceRecord]:
    """UrbanSound8K: `audio/fold<k>/<fsID>-<classID>-<occ>-<slice>.wav` + `metadata/UrbanSound8K.csv`.

    speaker = the freesound recording the slice was cut from (`fsID`), group = the fold, label = the class.
    """
    meta = _find(root, "metadata/UrbanSound8K.csv")
    if meta is None:
        raise DataError(root, "not an UrbanSound8K tree: no metadata/UrbanSound8K.csv")
    base = meta.parent.parent
    out = []
    with open(meta, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                name, fold, fs_id, label = row["slice_file_name"], row["fold"], row["fsID"], row["class"]
            except KeyError as e:
                raise DataError(meta, f"missing column {e} (need slice_file_name, fold, fsID, class)") from None
            f = base / "audio" / f"fold{fold}" / name
            if f.exists():  # a listed but absent slice is not an error: people import single folds
                out.append(
                    _record(root, f, utterance=Path(name).stem, speaker=fs_id, group=f"fold{fold}",
                            kind="environment", label=label)
                )  # fmt: skip
    return out


def import_folder(root: Path, kind: str = "other") -> list[SourceRecord]:
    """Any folder of audio files, searched recursively. The group is the first sub-folder under `root` (one
    folder per speaker is the common convention); files directly in `root` are each their own group."""
    out = []
    for f in _audio_files(root):
        rel = f.relative_to(root)
        group = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        utterance = rel.with_suffix("").as_posix().replace("/", "__")
        out.append(_record(root, f, utterance=utterance, speaker=group, group=group, kind=kind))
    return out


def _looks_like(root: Path) -> str | None:
    """The layout of `root` from its tell-tale folders and files, or None."""
    if root.name == "wav48_silence_trimmed" or _find(root, "wav48_silence_trimmed"):
        return "vctk"
    if _noisy_vctk_dirs(root):
        return "noisy-vctk"
    if _find(root, "metadata/UrbanSound8K.csv"):
        return "urbansound8k"
    if root.name in ("genres_original", "genres") or _find(root, "genres_original"):
        return "gtzan"
    meta = _find(root, "metadata.csv")
    if meta is not None and (meta.parent / "wavs").is_dir():
        return "ljspeech"
    if any(d.is_dir() and _LIBRI_SPLIT.match(d.name) for d in [root, *root.glob("*"), *root.glob("*/*")]):
        return "librispeech"
    return None


IMPORTERS: dict[str, Callable[..., list[SourceRecord]]] = {
    "vctk": import_vctk,
    "noisy-vctk": import_noisy_vctk,
    "librispeech": import_librispeech,
    "ljspeech": import_ljspeech,
    "gtzan": import_gtzan,
    "urbansound8k": import_urbansound8k,
    "folder": import_folder,
}
LAYOUTS = ("auto", *IMPORTERS)


def detect_layout(root: str | Path) -> str:
    """Name of the layout of `root` ("folder" when no dataset layout matches)."""
    return _looks_like(Path(root)) or "folder"


def scan(root: str | Path, layout: str = "auto", *, kind: str | None = None) -> tuple[str, list[SourceRecord]]:
    """(layout, records) of the source folder `root`. `kind` overrides the kind of the `folder` layout.

    Raises DataError for a missing folder, an unknown layout, a tree that is not in the layout, or no audio.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "no such directory" if not root.exists() else "not a directory")
    if layout not in LAYOUTS:
        raise DataError(layout, f"unknown layout; choose one of {', '.join(LAYOUTS)}")
    if kind is not None and kind not in KINDS:
        raise DataError(kind, f"unknown kind; choose one of {', '.join(KINDS)}")
    if layout == "auto":
        layout = detect_layout(root)
    records = IMPORTERS[layout](root, kind=kind or "other") if layout == "folder" else IMPORTERS[layout](root)
    if not records:
        raise DataError(root, f"no audio files found (layout {layout}; looked for {', '.join(sorted(AUDIO_SUFFIXES))})")
    seen: dict[str, str] = {}
    for r in records:
        if r.utterance in seen:
            raise DataError(r.rel, f"duplicate utterance id {r.utterance!r} (also {seen[r.utterance]})")
        seen[r.utterance] = r.rel
    return layout, records
