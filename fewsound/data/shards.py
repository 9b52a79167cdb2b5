"""A prepared corpus: Parquet shards + `manifest.json`, written by `process_shard`, read by `open_corpus`.

A corpus lives in a local folder, a mounted shared filesystem or an object store (`s3://bucket/corpus`,
`gs://...`): every read and write goes through `fewsound.storage` (pyarrow.fs). Readers stream: a clip is read
from its shard's row group when it is asked for, never the whole corpus per process.

Folder (or prefix) layout:
    manifest.json              what the corpus is (see `write_manifest`); written last, atomically
    train-00000.parquet        one shard: rows = stored clips, `audio` = float32 list (bit-exact round trip)
    receipts/train-00000.json  written right after its shard: the shard's key, sha256, rows and rejected files

The receipt makes an import resumable without the manifest: a shard whose receipt has the same key (a hash of
the protocol and the exact input files) and whose bytes hash to the recorded sha256 is complete and is not
rewritten. Every file appears whole (`storage.write_bytes`: temp name + rename on a filesystem, one upload on an
object store), receipts after their shard and the manifest last, so an interrupted import leaves only complete
shards (and, on a filesystem, stray `.tmp` files, removed when the manifest is written).

`process_shard` is a plain function of one picklable `ShardPlan`: a caller runs it serially or as a Ray task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fewsound import storage
from fewsound.data.audio import TooShort, check_samples, is_silent, load_audio
from fewsound.data.protocols import Protocol, WorkItem, clip_starts
from fewsound.errors import AudioError, DataError

FORMAT = "fewsound-corpus/1"
MANIFEST = "manifest.json"
RECEIPTS = "receipts"
_SHARD_NAME = re.compile(r"^(train|validation|test)-\d{5}\.parquet$")

SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),  # "<utterance>@<start>": unique in the corpus, stable across re-imports
        ("utterance", pa.string()),
        ("speaker", pa.string()),
        ("group", pa.string()),
        ("kind", pa.string()),
        ("label", pa.string()),
        ("split", pa.string()),
        ("sample_rate", pa.int32()),
        ("start", pa.int64()),  # first sample of the clip in the resampled source file
        ("n_samples", pa.int64()),
        ("peak", pa.float32()),  # max |audio|: peak normalisation at load time without a second pass
        ("source_path", pa.string()),  # relative to the manifest's `source`
        ("pair_path", pa.string()),  # noisy VCTK: the clean twin; "" otherwise
        ("audio", pa.list_(pa.float32())),
    ]
)


# ------------------------------------------------------------------------------------------------ planning
@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Everything one worker needs to write one shard (picklable, no open handles)."""

    out_dir: str  # the corpus's location: an absolute path or a URI (storage.normalize)
    name: str  # "train-00000"
    split: str
    items: tuple[WorkItem, ...]
    protocol: Protocol
    key: str  # hash of the protocol and the exact inputs: a receipt with another key is stale
    strict: bool = False

    @property
    def path(self) -> str:
        """Where the shard goes (a path or URI, like out_dir)."""
        return storage.join(self.out_dir, f"{self.name}.parquet")


def _file_sig(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def plan_shards(items: list[WorkItem], out_dir: str | Path, protocol: Protocol, *, shard_size: int = 64,
                strict: bool = False) -> list[ShardPlan]:  # fmt: skip
    """Deterministic assignment of work items to shards: consecutive runs of `shard_size` items per split.

    items must be in `plan_items` order; the same inputs and protocol give the same shards and keys.
    """
    if shard_size < 1:
        raise DataError("shard_size", f"must be >= 1, got {shard_size}")
    proto = json.dumps(dataclasses.asdict(protocol), sort_keys=True)
    plans: list[ShardPlan] = []
    for split in dict.fromkeys(it.split for it in items):
        chunk = [it for it in items if it.split == split]
        for i in range(0, len(chunk), shard_size):
            part = tuple(chunk[i : i + shard_size])
            h = hashlib.sha256(f"{FORMAT}|{proto}".encode())
            for it in part:
                for r in it.candidates:
                    h.update(f"|{it.split}|{it.take}|{r.rel}|{r.utterance}|{r.speaker}|{r.group}|{r.kind}|{r.label}"
                             f"|{r.pair}|{_file_sig(r.path)}".encode())  # fmt: skip
            name = f"{split}-{i // shard_size:05d}"
            plans.append(ShardPlan(storage.normalize(out_dir), name, split, part, protocol, h.hexdigest(), strict))
    return plans


# ---------------------------------------------------------------------------------------------- processing
@dataclasses.dataclass
class ShardResult:
    name: str
    split: str
    file: str  # shard file name inside the corpus folder
    rows: int
    sha256: str
    bytes: int
    rejected: list[dict]  # {"path", "reason", "fault"}: fault False = valid but too short for the protocol
    kinds: dict[str, int]  # rows per kind
    speakers: list[str]
    n_inputs: int  # source files this shard covered
    seconds: float = 0.0
    skipped: bool = False  # True when a complete shard from an earlier run was kept


def sha256_file(path: str | Path) -> str:
    """sha256 of a shard (a path or URI), streamed."""
    return storage.sha256(path)


def _receipt_path(plan: ShardPlan) -> str:
    return storage.join(plan.out_dir, RECEIPTS, f"{plan.name}.json")


def completed(plan: ShardPlan) -> ShardResult | None:
    """The result of an earlier run of `plan` if its shard is complete and intact (checksum-verified)."""
    try:
        rec = json.loads(storage.read_bytes(_receipt_path(plan)))
        if rec["key"] != plan.key or storage.size(plan.path) != rec["bytes"]:
            return None
        if sha256_file(plan.path) != rec["sha256"]:
            return None
        rec.pop("key")
        return ShardResult(**{**rec, "skipped": True, "seconds": 0.0})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _clips_of(item: WorkItem, protocol: Protocol, strict: bool, rejected: list[dict]) -> Iterator[dict]:
    """Rows of one work item; faulty inputs are appended to `rejected` (or raised when `strict`)."""
    got = 0
    for rec in item.candidates:
        if item.take and got >= item.take:
            break
        try:
            x = load_audio(rec.path, protocol.sample_rate)
            check_samples(x, where=rec.path, allow_silent=False)
            rows = []
            for s in clip_starts(x.shape[-1], rec, protocol):
                clip = x[s : s + protocol.stored_length]
                if not is_silent(clip):  # a silent segment inside a valid file is dropped, not stored
                    rows.append((s, clip))
            if not rows:
                raise AudioError(rec.path, f"every clip the protocol cuts from it is silent ({protocol.name})")
        except AudioError as e:
            fault = not isinstance(e, TooShort)
            if strict and fault:
                raise AudioError(rec.path, e.problem) from None
            rejected.append({"path": rec.rel, "reason": e.problem, "fault": fault})
            continue
        for s, clip in rows:
            got += 1
            yield {
                "clip_id": f"{rec.utterance}@{s}", "utterance": rec.utterance, "speaker": rec.speaker,
                "group": rec.group, "kind": rec.kind, "label": rec.label, "split": item.split,
                "sample_rate": protocol.sample_rate, "start": s, "n_samples": int(clip.shape[-1]),
                "peak": float(np.abs(clip).max()), "source_path": rec.rel, "pair_path": rec.pair,
                "audio": np.ascontiguousarray(clip, dtype=np.float32),
            }  # fmt: skip


def _to_table(rows: list[dict]) -> pa.Table:
    cols = {f.name: [r[f.name] for r in rows] for f in SCHEMA if f.name != "audio"}
    arrays = [pa.array(cols[f.name], type=f.type) for f in SCHEMA if f.name != "audio"]
    # the audio column straight from the float32 buffers (no per-sample Python objects)
    lengths = np.array([r["audio"].shape[-1] for r in rows], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate([r["audio"] for r in rows]) if rows else np.empty(0, np.float32)
    audio = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32()))
    return pa.Table.from_arrays([*arrays, audio], schema=SCHEMA)


def process_shard(plan: ShardPlan) -> ShardResult:
    """Decode, validate, resample and cut the inputs of `plan`; write its shard and receipt atomically.

    A complete shard from an earlier run is kept untouched (result.skipped). Faulty inputs are listed in
    result.rejected; with `plan.strict` a faulty input raises AudioError naming it instead.
    """
    done = completed(plan)
    if done is not None:
        return done
    t0 = time.perf_counter()
    rejected: list[dict] = []
    rows = [row for item in plan.items for row in _clips_of(item, plan.protocol, plan.strict, rejected)]
    buf = io.BytesIO()
    pq.write_table(_to_table(rows), buf, compression="zstd", row_group_size=64)
    data = buf.getvalue()
    storage.write_bytes(plan.path, data)
    result = ShardResult(
        name=plan.name, split=plan.split, file=f"{plan.name}.parquet", rows=len(rows),
        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), rejected=rejected,
        kinds=dict(Counter(r["kind"] for r in rows)),
        speakers=sorted({r["speaker"] for r in rows}), n_inputs=sum(len(it.candidates) for it in plan.items),
        seconds=round(time.perf_counter() - t0, 3),
    )  # fmt: skip
    receipt = {**dataclasses.asdict(result), "key": plan.key}
    receipt.pop("skipped")
    storage.write_bytes(_receipt_path(plan), json.dumps(receipt, indent=1).encode())  # after its shard
    return result


# ------------------------------------------------------------------------------------------------ manifest
def write_manifest(out_dir: str | Path, results: list[ShardResult], *, source: str, layout: str,
                   protocol: Protocol, n_inputs: int, extra: dict | None = None) -> dict:  # fmt: skip
    """Write `manifest.json` for the shards in `results` (atomically) and delete stale shards and temp files."""
    import fewsound

    out = storage.normalize(out_dir)
    counts: dict[str, int] = Counter()
    by_kind: dict[str, Counter] = {}
    speakers: dict[str, set] = {}
    for r in results:
        counts[r.split] += r.rows
        by_kind.setdefault(r.split, Counter()).update(r.kinds)
        speakers.setdefault(r.split, set()).update(r.speakers)
    manifest = {
        "format": FORMAT,
        "fewsound_version": fewsound.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source,
        "layout": layout,
        "protocol": dataclasses.asdict(protocol),
        "sample_rate": protocol.sample_rate,
        "clip_length": protocol.clip_length,
        "stored_length": protocol.stored_length,
        "n_source_files": n_inputs,
        "counts": dict(counts),
        "counts_by_kind": {s: dict(c) for s, c in by_kind.items()},
        "speakers": {s: sorted(v) for s, v in speakers.items()},
        "kinds": sorted({k for c in by_kind.values() for k in c}),
        "shards": [
            {"file": r.file, "split": r.split, "rows": r.rows, "bytes": r.bytes, "sha256": r.sha256} for r in results
        ],
        "rejected": [rej for r in results for rej in r.rejected],
        **(extra or {}),
    }
    keep = {r.file for r in results}
    for name in storage.listdir(out):  # shards of an earlier, different plan and temp files of killed writers
        if (_SHARD_NAME.match(name) and name not in keep) or name.endswith(".tmp"):
            storage.delete(storage.join(out, name))
            storage.delete(storage.join(out, RECEIPTS, name.replace(".parquet", ".json")))
    storage.write_bytes(storage.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())  # last
    return manifest


# --------------------------------------------------------------------------------------------------- reader
@dataclasses.dataclass(frozen=True)
class ClipInfo:
    """What the corpus says about one stored clip, without its audio (cheap: read from the metadata columns)."""

    clip_id: str
    utterance: str
    speaker: str
    group: str
    kind: str
    label: str
    split: str
    sample_rate: int
    start: int
    n_samples: int
    peak: float
    source_path: str
    pair_path: str


@dataclasses.dataclass(frozen=True)
class Clip(ClipInfo):
    """One stored clip. audio: float32 [n_samples] (raw, not peak-normalised; see `peak`)."""

    audio: np.ndarray


META_COLUMNS = [f.name for f in SCHEMA if f.name != "audio"]
ROW_GROUP_CACHE = 4  # row groups (up to 64 clips each) a Corpus keeps decoded for `clip()`


class Corpus:
    """A prepared corpus at a path or URI. `open_corpus(location)` builds it; nothing is read until asked for.

    corpus.location                 where it is (an absolute path or a URI); corpus.name: its last component
    corpus.manifest                 the parsed manifest.json
    corpus.splits                   e.g. ["train", "validation"]
    corpus.shard_paths("train")     [path or URI, ...]  (for ray.data.read_parquet or your own reader)
    corpus.table("train")           pyarrow.Table of every column
    corpus.infos("train")           [ClipInfo]: every clip's metadata, no audio read
    corpus.clips("validation")      iterator of Clip, one shard in memory at a time
    corpus.clip("p225_001@11025")   one Clip, read from its shard's row group (a few are cached)
    corpus.arrays("train")          (float32 [n, L], [metadata dicts]) when every clip has length L
    corpus.verify()                 sha256 of every shard against the manifest (DataError on mismatch)
    """

    def __init__(self, location: str, manifest: dict):
        self.location = storage.normalize(location)
        self.manifest = manifest
        self._index: dict[str, tuple[str, int, int]] | None = None  # clip_id -> (shard, row group, row)
        self._groups: dict[tuple[str, int], pa.Table] = {}

    @property
    def root(self) -> str:
        """Same as `location` (the name older callers use)."""
        return self.location

    @property
    def name(self) -> str:
        return storage.name(self.location)

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(s["split"] for s in self.manifest["shards"]))

    @property
    def sample_rate(self) -> int:
        return int(self.manifest["sample_rate"])

    @property
    def clip_length(self) -> int:
        return int(self.manifest["clip_length"])

    def __len__(self) -> int:
        return sum(self.manifest["counts"].values())

    def count(self, split: str | None = None) -> int:
        return len(self) if split is None else int(self.manifest["counts"].get(split, 0))

    def shard_paths(self, split: str | None = None) -> list[str]:
        if split is not None and split not in self.splits:
            raise DataError(self.location, f"no split {split!r}; this corpus has {self.splits}")
        return [
            storage.join(self.location, s["file"])
            for s in self.manifest["shards"]
            if split is None or s["split"] == split
        ]

    def verify(self) -> None:
        for s in self.manifest["shards"]:
            p = storage.join(self.location, s["file"])
            if not storage.exists(p):
                raise DataError(p, "shard listed in manifest.json is missing")
            if sha256_file(p) != s["sha256"]:
                raise DataError(p, "checksum mismatch: the shard changed or is corrupt (re-run prepare_data)")

    def _parquet(self, path: str) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(storage.open_input_file(path))
        except FileNotFoundError:
            raise DataError(path, "shard listed in manifest.json is missing") from None
        except (pa.ArrowException, OSError) as e:
            raise DataError(path, f"corrupt Parquet shard ({e})") from None

    def _read(self, path: str, columns: list[str] | None = None) -> pa.Table:
        pf = self._parquet(path)
        try:
            return pf.read(columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise DataError(path, f"corrupt Parquet shard ({e})") from None

    def table(self, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
        tables = [self._read(p, columns) for p in self.shard_paths(split)]
        if not tables:
            return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
        return pa.concat_tables(tables)

    def infos(self, split: str | None = None) -> list[ClipInfo]:
        """Every clip's metadata in shard order; reads the small columns only, never the audio."""
        return [ClipInfo(**row) for row in self.table(split, META_COLUMNS).to_pylist()]

    def clips(self, split: str | None = None) -> Iterator[Clip]:
        for path in self.shard_paths(split):
            yield from _clips_of_table(self._read(path))

    def clip(self, clip_id: str) -> Clip:
        """One clip, read from the row group that holds it (DataError when the corpus has no such clip)."""
        if self._index is None:
            self._index = self._build_index()
        if clip_id not in self._index:
            raise DataError(self.location, f"has no clip {clip_id!r}")
        path, group, row = self._index[clip_id]
        key = (path, group)
        if key not in self._groups:
            if len(self._groups) >= ROW_GROUP_CACHE:
                self._groups.pop(next(iter(self._groups)))  # the oldest: packs read their clips in order
            try:
                self._groups[key] = self._parquet(path).read_row_group(group)
            except (pa.ArrowException, OSError) as e:
                raise DataError(path, f"corrupt Parquet shard ({e})") from None
        return next(_clips_of_table(self._groups[key].slice(row, 1)))

    def _build_index(self) -> dict[str, tuple[str, int, int]]:
        """clip_id -> (shard, row group, row in the group), from the clip_id column and the Parquet footers."""
        index = {}
        for path in self.shard_paths():
            pf = self._parquet(path)
            ids = pf.read(columns=["clip_id"]).column(0).to_pylist()
            i = 0
            for g in range(pf.metadata.num_row_groups):
                for r in range(pf.metadata.row_group(g).num_rows):
                    index[ids[i]] = (path, g, r)
                    i += 1
        return index

    def arrays(self, split: str) -> tuple[np.ndarray, list[dict]]:
        """All clips of `split` as one float32 array [n, L] (every stored clip has the same length L) plus
        their metadata rows (every column but audio), in the same order."""
        t = self.table(split)
        audio = t.column("audio").combine_chunks()
        values = audio.values.to_numpy(zero_copy_only=False)
        lengths = np.diff(audio.offsets.to_numpy())
        if len(lengths) and (lengths != lengths[0]).any():
            raise DataError(self.location, f"split {split!r} mixes clip lengths {sorted(set(lengths.tolist()))}")
        n = len(lengths)
        return values.reshape(n, int(lengths[0]) if n else 0), t.drop_columns(["audio"]).to_pylist()


def _clips_of_table(t: pa.Table) -> Iterator[Clip]:
    audio = t.column("audio").combine_chunks()
    values = audio.values.to_numpy(zero_copy_only=False)
    offsets = audio.offsets.to_numpy()
    for i, row in enumerate(t.drop_columns(["audio"]).to_pylist()):
        yield Clip(**row, audio=values[offsets[i] : offsets[i + 1]])


def open_prepared(where: str | Path, *, verify: bool = False) -> Corpus:
    """The prepared corpus at `where`: a folder or a URI (s3://bucket/corpus, gs://..., file://...); it reads,
    never prepares (names such as `builtin:inr-1.5s` are resolved by fewsound.data.corpus.open_corpus). DataError
    when it is missing, unfinished or corrupt."""
    loc = storage.normalize(where)
    try:
        if not storage.is_dir(loc):
            raise DataError(loc, "no such corpus folder (run jobs/prepare_data.py first)")
        mpath = storage.join(loc, MANIFEST)
        if not storage.exists(mpath):
            raise DataError(
                mpath, "missing: not a prepared corpus, or its import was interrupted (re-run prepare_data)"
            )
        manifest = json.loads(storage.read_bytes(mpath))
    except (OSError, ValueError) as e:
        raise DataError(loc, f"unreadable corpus ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(
            mpath,
            f"not a {FORMAT} manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})",
        )
    corpus = Corpus(loc, manifest)
    present = set(storage.listdir(loc))  # one listing, not one request per shard
    for s in manifest["shards"]:
        if s["file"] not in present:
            raise DataError(storage.join(loc, s["file"]), "shard listed in manifest.json is missing")
    if verify:
        corpus.verify()
    return corpus
