"""Nothing computed is lost: fit records (fewsound.records) on local disk and on a real S3-compatible server, and
every process of a sweep killed once (the MLflow server, a trial's worker) while the sweep runs as a user runs it.

The kill tests run tests/durable_driver.py (run_sweep over tiny NeRF fits, as the sweep jobs call it) as its own
process with its own FEWSOUND_HOME and local Ray, and prove that no fit is refitted by the records'
computed-at times: a record is rewritten only when its fit is computed again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fewsound import records, storage
from fewsound.records import FitRecord

REPO = Path(__file__).resolve().parents[1]
DRIVER = [sys.executable, str(REPO / "tests" / "durable_driver.py")]


def _record(key: str, sweep: str = "sw-1", status: str = "FINISHED") -> FitRecord:
    return FitRecord(
        key=key,
        sweep=sweep,
        run_name=key,
        tags={"fewsound.fit_key": key},
        params={"fit.steps": "3"},
        metrics={"eval/mse": 0.25, "eval/psnr": 6.02},
        status=status,
        reason=None if status == "FINISHED" else "diverged at step 2",
        curves={"fit/loss_curve": [(0, 1.0), (1, 0.5)]},
    )


def _round_trip(root: str, tmp_path: Path) -> None:
    files = {"audio/gt.wav": b"RIFF-gt", "audio/pred.wav": b"RIFF-pred", "plots/spectrogram.png": b"\x89PNG"}
    a = _record("nerf-clip/one-abc")  # a clip id may hold a slash: the key is one folder
    records.write_record(root, a, files)
    records.write_record(root, _record("nerf-two-abc", status="FAILED"))
    records.write_record(root, _record("other-sweep-key", sweep="sw-2"))
    back = records.read_record(root, "sw-1", a.key)
    assert back is not None and back.artifacts == sorted(files)
    assert (back.metrics, back.curves, back.status, back.computed_at, back.pid) == (
        a.metrics,
        a.curves,
        "FINISHED",
        a.computed_at,
        os.getpid(),
    )
    assert records.read_record(root, "sw-1", "nerf-none-abc") is None
    assert records.scan(root, "sw-1") == {"nerf-clip/one-abc": False, "nerf-two-abc": False}
    records.mark_logged(root, "sw-1", a.key, "run123")
    assert records.scan(root, "sw-1") == {"nerf-clip/one-abc": True, "nerf-two-abc": False}
    assert records.logged_run(root, "sw-1", a.key) == "run123"
    folder = records.artifacts_folder(root, "sw-1", a.key, back.artifacts, tmp_path / "scratch")
    assert {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files
    # a rewrite (a failed fit computed again) replaces the record and forgets that the old one was logged
    records.write_record(root, _record(a.key), files)
    assert records.scan(root, "sw-1")[a.key] is False
    assert records.scan(root, "no-such-sweep") == {}


def test_records_round_trip_on_local_disk(tmp_path):
    root = str(tmp_path / "records")
    _round_trip(root, tmp_path)
    leftovers = [p for p in (tmp_path / "records").rglob("*.tmp")]
    assert not leftovers  # every file was written whole (temp + rename)


def test_records_round_trip_on_s3(s3, tmp_path):
    root = "s3://fewsound/state/records"
    _round_trip(root, tmp_path)
    keys = s3.keys("fewsound", "state/records/sw-1/")
    assert "state/records/sw-1/nerf-clip%2Fone-abc/artifacts/audio/gt.wav" in keys
    assert "state/records/sw-1/nerf-clip%2Fone-abc/record.json" in keys
    assert not any(k.startswith("state/records/sw-1/nerf-two-abc/artifacts") for k in keys)  # it has no files


def test_an_uncommitted_record_is_not_listed(tmp_path):
    """A process killed after writing a fit's files but before its record.json leaves no record."""
    root = str(tmp_path / "records")
    where = records.record_dir(root, "sw-1", "nerf-a-abc")
    storage.write_bytes(storage.join(where, records.ARTIFACTS, "audio", "gt.wav"), b"RIFF")
    assert records.scan(root, "sw-1") == {} and records.read_record(root, "sw-1", "nerf-a-abc") is None
