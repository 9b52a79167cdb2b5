"""Fit records: every finished fit's result, kept in the sweep's storage before anything is logged anywhere.

    rec = FitRecord(key=..., sweep=..., run_name=..., tags=..., params=..., metrics=..., status="FINISHED")
    put_target(root, sweep, target_name(clip_id, length, sr), encode)   the clip's target audio, once per sweep
    rec = write_record(root, rec, {"audio/pred.flac": b"...", "plots/spectrogram.png": b"..."})
    read_record(root, sweep, key)      the record, or None when the fit has none (not computed, or cut short)
    scan(root, sweep)                  {key: logged?} of every committed record, in one listing
    mark_logged(root, sweep, key, run_id)
    artifacts_folder(root, sweep, key, scratch)   a local folder with the record's files (downloaded if remote)
    release_files(root, sweep, key, files)        the files are in the logged run now: removed here

A tracking server can be down, restarted or unreachable from a worker; a computed fit is too costly to throw
away then. So a trial writes each fit's result here first, and logging it (tune.sweep.durable) is a replay of the
record that may happen at once, later in the same sweep, or in a re-run of the same command.

Each file has one durable copy at a time: here until its MLflow run holds it (the run is complete), then in
MLflow's artifact store only (`release_files`, `target_logged`); record.json and logged.json stay, so the
record still says what the fit's run shows and which run that is. A clip's target audio is the same for every
family and setting fitted to it, so it is kept once per sweep, clip, length and sample rate (`_targets/`) and
logged once on the sweep's parent run; each fit's run references it (tune.spine.TARGET_AUDIO_TAG).

Layout under `root` (a local folder, a shared path or an object-store URI; fewsound.storage writes each file
whole or not at all):

    root/<sweep>/<key>/artifacts/audio/pred.flac ...   the fit's files, written first (until logged)
    root/<sweep>/<key>/record.json                  the commit marker, written last: a reader that finds it finds
                                                    every file it lists (or, once logged, their run)
    root/<sweep>/<key>/logged.json                  written once the record's MLflow run is complete
    root/<sweep>/_targets/<clip>-<length>-<sr>.flac   a clip's target audio, until logged on the parent run
    root/<sweep>/_targets/<name>.logged             written once it is (then the .flac is removed)

No Ray and no MLflow here: a record is plain JSON (tags, params, finite metrics, curves, status and reason) plus
its files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote

import pyarrow.fs as pafs

from fewsound import storage

RECORD = "record.json"
LOGGED = "logged.json"
ARTIFACTS = "artifacts"
TARGETS = "_targets"  # not a fit key: keys start with a family name
TARGET_LOGGED = ".logged"
VERSION = 1


@dataclasses.dataclass
class FitRecord:
    """One fit's result, as its MLflow child run will show it."""

    key: str
    sweep: str
    run_name: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]  # finite values only
    status: str  # FINISHED or FAILED
    reason: str | None = None  # why a FAILED fit failed
    curves: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)  # {name: [(step, value)]}
    artifacts: list[str] = dataclasses.field(default_factory=list)  # files under artifacts/, relative paths
    computed_at: float = dataclasses.field(default_factory=time.time)  # epoch seconds of the write
    pid: int = dataclasses.field(default_factory=os.getpid)  # the process that computed it (and its host)
    host: str = dataclasses.field(default_factory=socket.gethostname)

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["version"] = VERSION
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> FitRecord:
        d = json.loads(data)
        d.pop("version", None)
        d["curves"] = {k: [(int(s), float(v)) for s, v in pts] for k, pts in d.get("curves", {}).items()}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def component(name: str) -> str:
    """A name (fit key, sweep id, experiment) as one path component: a clip id or an experiment name may hold any
    character."""
    return quote(name, safe="-_.")


def record_dir(root: str, sweep: str, key: str) -> str:
    return storage.join(root, component(sweep), component(key))


def write_record(root: str, rec: FitRecord, files: dict[str, bytes] | None = None) -> FitRecord:
    """Write the record's files, then its record.json (the commit marker). Returns the record as written (its
    `artifacts` list the files).

    A rewrite of a key (a re-fit of a failed fit) replaces the record and forgets that the old one was logged."""
    where = record_dir(root, rec.sweep, rec.key)
    files = files or {}
    for rel, data in files.items():
        assert not rel.startswith("/") and ".." not in rel.split("/"), rel
        storage.write_bytes(storage.join(where, ARTIFACTS, rel), data)
    storage.delete(storage.join(where, LOGGED))
    rec = dataclasses.replace(rec, artifacts=sorted(files))
    storage.write_bytes(storage.join(where, RECORD), rec.to_json())
    return rec


def read_record(root: str, sweep: str, key: str) -> FitRecord | None:
    try:
        return FitRecord.from_json(storage.read_bytes(storage.join(record_dir(root, sweep, key), RECORD)))
    except FileNotFoundError:
        return None


def has_record(root: str, sweep: str, key: str) -> bool:
    return storage.exists(storage.join(record_dir(root, sweep, key), RECORD))


def logged_run(root: str, sweep: str, key: str) -> str | None:
    """The MLflow run id the record was logged as, or None."""
    try:
        return json.loads(storage.read_bytes(storage.join(record_dir(root, sweep, key), LOGGED)))["run_id"]
    except FileNotFoundError:
        return None


def mark_logged(root: str, sweep: str, key: str, run_id: str) -> None:
    body = json.dumps({"run_id": run_id, "logged_at": time.time()}).encode()
    storage.write_bytes(storage.join(record_dir(root, sweep, key), LOGGED), body)


def scan(root: str, sweep: str) -> dict[str, bool]:
    """{key: logged} for every committed record of a sweep, from one (recursive) listing of its folder."""
    fs, base = storage.location(storage.join(root, component(sweep)))
    base = base.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
    committed, logged = set(), set()
    for info in infos:
        folder, _, leaf = info.path.rpartition("/")
        parent, _, name = folder.rpartition("/")
        if info.type != pafs.FileType.File or parent != base:
            continue  # a folder, or a file deeper down (an artifact)
        if leaf == RECORD:
            committed.add(unquote(name))
        elif leaf == LOGGED:
            logged.add(unquote(name))
    return {key: key in logged for key in sorted(committed)}


def artifacts_folder(root: str, sweep: str, key: str, files: list[str], scratch: Path) -> Path:
    """A local folder holding the record's `files` (relative paths) that are still here (see `release_files`):
    the record's own folder when the storage is local, else a download of them into `scratch`."""
    where = storage.join(record_dir(root, sweep, key), ARTIFACTS)
    if storage.is_local(where) and not storage.is_uri(where):
        return Path(where)
    for rel in files:
        try:
            storage.download_file(storage.join(where, rel), scratch / rel)
        except FileNotFoundError:
            continue  # released: its run holds it
    return scratch


def release_files(root: str, sweep: str, key: str, files: list[str]) -> None:
    """Remove the record's `files` once its MLflow run is complete and holds them (call after `mark_logged`):
    one durable copy of each. The record keeps listing them; logged.json names the run that has them."""
    where = storage.join(record_dir(root, sweep, key), ARTIFACTS)
    for rel in files:
        storage.delete(storage.join(where, rel))
    if storage.is_local(where) and not storage.is_uri(where):  # and the folders they leave empty (object stores
        folders = {Path(where, rel).parent for rel in files}  # have none)
        for folder in sorted(folders | {f for d in folders for f in d.parents}, key=lambda p: -len(p.parts)):
            if folder == Path(where) or Path(where) in folder.parents:
                with contextlib.suppress(OSError):  # not empty, or gone
                    folder.rmdir()


# --- a clip's target audio: once per sweep, clip, length and sample rate ----------------------------------------


def target_name(clip_id: str, length: int, sr: int) -> str:
    """`<clip>-<length>-<sr>.flac`, the target's file name here and its artifact name on the parent run: the clip
    id as is when it is made of [A-Za-z0-9._-] only, else those characters plus a hash of the id (an artifact
    path travels in URLs)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", clip_id)
    if safe != clip_id:
        safe += "_" + hashlib.sha1(clip_id.encode()).hexdigest()[:8]
    return f"{safe}-{int(length)}-{int(sr)}.flac"


def target_path(root: str, sweep: str, name: str) -> str:
    return storage.join(root, component(sweep), TARGETS, name)


def put_target(root: str, sweep: str, name: str, encode: Callable[[], bytes]) -> bool:
    """Write the target `name` (the bytes `encode()` returns) unless it is here or logged already. Returns whether
    it was written. Write it before the records that reference it, so that a committed record's target is
    durable too."""
    path = target_path(root, sweep, name)
    if storage.exists(path) or storage.exists(path + TARGET_LOGGED):
        return False
    storage.write_bytes(path, encode())
    return True


def target_is_logged(root: str, sweep: str, name: str) -> bool:
    return storage.exists(target_path(root, sweep, name) + TARGET_LOGGED)


def pending_targets(root: str, sweep: str) -> list[str]:
    """Names of the sweep's targets written but not yet logged (a file left by a process that died between
    `target_logged`'s two steps is removed)."""
    names = storage.listdir(storage.join(root, component(sweep), TARGETS))
    logged = {n[: -len(TARGET_LOGGED)] for n in names if n.endswith(TARGET_LOGGED)}
    for n in logged.intersection(names):
        storage.delete(target_path(root, sweep, n))
    return [n for n in names if n.endswith(".flac") and n not in logged]


def target_logged(root: str, sweep: str, name: str, run_id: str) -> None:
    """The target is an artifact of run `run_id` now: note it, then remove the file here."""
    path = target_path(root, sweep, name)
    storage.write_bytes(path + TARGET_LOGGED, json.dumps({"run_id": run_id, "logged_at": time.time()}).encode())
    storage.delete(path)
