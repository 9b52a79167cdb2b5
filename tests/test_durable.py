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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import REPO, free_port  # tests/support.py
from test_s3 import _healthy  # tests/ is on sys.path (rootdir-relative imports)

from fewsound import records, storage
from fewsound.records import FitRecord
from tune.sweep.durable import TARGETS_DIR, TrackingWatch, replay_pending  # torch, at collection (not in a unit test)

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


def test_replay_is_idempotent_ends_a_half_logged_run_and_relogs_a_lost_run(env, tmp_path):
    """tune.sweep.durable.replay_pending against the test session's MLflow server: each record once, a run left RUNNING
    by a logger that died is ended KILLED and replaced, a record whose run the store lost is logged again."""
    from mlflow.tracking import MlflowClient

    from fewsound.tracking import get_or_create_experiment
    from tune.spine import FIT_KEY_TAG, SWEEP_TAG

    client = MlflowClient(tracking_uri=env[1])
    exp = get_or_create_experiment(client, "t-replay")
    parent = client.create_run(exp, run_name="parent").info.run_id
    root, sweep = str(tmp_path / "records"), "sw-replay"
    files = {"audio/gt.wav": b"RIFF-gt", "plots/spectrogram.png": b"\x89PNG"}

    def rec(key: str, status: str = "FINISHED") -> FitRecord:
        r = _record(key, sweep, status)
        r.tags = {FIT_KEY_TAG: key, SWEEP_TAG: sweep}
        return r

    def runs(key: str) -> list:
        return client.search_runs([exp], f"tags.`{FIT_KEY_TAG}` = '{key}'", max_results=100)

    records.write_record(root, rec("a"), files)
    records.write_record(root, rec("b", "FAILED"))
    a_files = storage.join(records.record_dir(root, sweep, "a"), records.ARTIFACTS)
    assert storage.exists(storage.join(a_files, "audio", "gt.wav"))  # durable before it is logged
    assert replay_pending(client, exp, root, sweep, parent, set()) == 2
    assert replay_pending(client, exp, root, sweep, parent, set()) == 0  # logged: nothing again
    (a,) = runs("a")
    assert a.info.status == "FINISHED" and a.data.metrics["eval/mse"] == 0.25 and a.data.params["fit.steps"] == "3"
    assert a.data.tags["mlflow.parentRunId"] == parent
    assert {f.path for f in client.list_artifacts(a.info.run_id, "audio")} == {"audio/gt.wav"}
    back = Path(client.download_artifacts(a.info.run_id, "audio/gt.wav", str(tmp_path / "a")))
    assert back.read_bytes() == files["audio/gt.wav"]
    # one durable copy: the run holds the files now, the record keeps its JSON (what the run shows, which run)
    assert not storage.exists(storage.join(a_files, "audio", "gt.wav"))
    assert sorted(p.name for p in Path(records.record_dir(root, sweep, "a")).iterdir()) == [
        "logged.json",
        "record.json",
    ]
    assert records.read_record(root, sweep, "a").artifacts == sorted(files)  # type: ignore[union-attr]
    assert records.logged_run(root, sweep, "a") == a.info.run_id
    assert [m.value for m in client.get_metric_history(a.info.run_id, "fit/loss_curve")] == [1.0, 0.5]
    assert [r.info.status for r in runs("b")] == ["FAILED"]

    # a logger died between creating c's run and ending it, and before it marked the record logged
    records.write_record(root, rec("c"), files)
    half = client.create_run(exp, run_name="c", tags={FIT_KEY_TAG: "c", SWEEP_TAG: sweep}).info.run_id
    assert replay_pending(client, exp, root, sweep, parent, set()) == 1
    assert sorted(r.info.status for r in runs("c")) == ["FINISHED", "KILLED"]
    assert client.get_run(half).info.status == "KILLED"

    # ... or died after ending it: the FINISHED run is found, nothing is created
    records.write_record(root, rec("d"))
    replay_pending(client, exp, root, sweep, parent, set())
    storage.delete(storage.join(records.record_dir(root, sweep, "d"), records.LOGGED))
    assert replay_pending(client, exp, root, sweep, parent, set()) == 0
    assert [r.info.status for r in runs("d")] == ["FINISHED"] and records.scan(root, sweep)["d"]

    # the tracking store lost a's run (e.g. restored from an older backup): the re-run logs it again (its files
    # went with the lost run, and the new run says so)
    client.delete_run(a.info.run_id)
    assert replay_pending(client, exp, root, sweep, parent, {"a"}) == 1
    assert [r.info.status for r in runs("a")] == ["FINISHED"] and runs("a")[0].info.run_id != a.info.run_id
    assert runs("a")[0].data.tags["fewsound.artifacts"] == f"lost with run {a.info.run_id}"


def test_a_clips_target_is_stored_once_and_logged_once_on_the_parent(env, tmp_path):
    """fewsound.records' targets: written once per sweep, clip, length and rate whatever fits share it, logged by
    tune.sweep.durable.replay_pending on the parent run, then removed from the sweep's storage (one durable copy)."""
    import soundfile as sf
    from mlflow.tracking import MlflowClient

    from fewsound.data.audio import flac_bytes
    from fewsound.tracking import get_or_create_experiment

    client = MlflowClient(tracking_uri=env[1])
    exp = get_or_create_experiment(client, "t-targets")
    parent = client.create_run(exp, run_name="parent").info.run_id
    root, sweep = str(tmp_path / "records"), "sw-targets"
    x = np.sin(np.linspace(0, 400, 4096)).astype(np.float32)
    encoded = []

    def encode() -> bytes:
        encoded.append(1)
        return flac_bytes(x, 22_050)

    name = records.target_name("fr/clip one", 4096, 22_050)
    assert name.endswith("-4096-22050.flac") and "/" not in name and " " not in name
    assert name != records.target_name("fr_clip one", 4096, 22_050)  # distinct ids stay distinct
    assert records.target_name("clip-1", 4096, 22_050) == "clip-1-4096-22050.flac"
    assert records.put_target(root, sweep, name, encode) and not records.put_target(root, sweep, name, encode)
    assert len(encoded) == 1 and records.pending_targets(root, sweep) == [name]
    assert records.scan(root, sweep) == {}  # a target is not a fit record
    assert replay_pending(client, exp, root, sweep, parent, set()) == 0  # no fit run; the target is logged
    assert [f.path for f in client.list_artifacts(parent, TARGETS_DIR)] == [f"{TARGETS_DIR}/{name}"]
    got, sr = sf.read(client.download_artifacts(parent, f"{TARGETS_DIR}/{name}", str(tmp_path)), dtype="float32")
    assert sr == 22_050 and np.abs(got - x).max() <= 2**-15  # 16-bit
    assert records.pending_targets(root, sweep) == [] and records.target_is_logged(root, sweep, name)
    assert not storage.exists(records.target_path(root, sweep, name))  # MLflow holds the one copy
    assert not records.put_target(root, sweep, name, encode) and len(encoded) == 1  # a later fit of the clip


# --------------------------------------------------------------------------------------------- kill tests

STEPS = "40"  # a few seconds per fit on a loaded 2-core machine: the kills land mid-sweep
FITS = 4  # one per pack, two trials at once: a kill after the first fit leaves fits to do


def _records(home: Path) -> dict[str, dict]:
    """key -> record.json of every committed record under the home's records folder."""
    out = {}
    for p in (home / "records").glob("*/*/*/record.json"):  # records/<experiment>/<sweep>/<key>/
        d = json.loads(p.read_text())
        d["logged"] = (p.parent / "logged.json").exists()
        out[d["key"]] = d
    return out


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, log.read_text()[-5000:]
        assert time.monotonic() < deadline, log.read_text()[-5000:]
        time.sleep(0.1)


def _one_finished_run_per_fit(uri: str, experiment: str, keys: set[str]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    kids = [r for r in runs if "fewsound.fit_key" in r.data.tags]
    finished = [r.data.tags["fewsound.fit_key"] for r in kids if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(keys), (sorted(finished), sorted(keys))  # each fit exactly once
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]  # parent included
    for r in kids:
        if r.info.status == "FINISHED":
            files = {a.path for a in client.list_artifacts(r.info.run_id, "audio")}
            assert files == {"audio/pred.flac"}, r.info.run_name
            parent, target = r.data.tags["mlflow.parentRunId"], r.data.tags["fewsound.target_audio"]
            assert target in {a.path for a in client.list_artifacts(parent, "targets")}, r.info.run_name


def _nothing_refitted(home: Path, before: dict[str, dict], uri: str, experiment: str) -> None:
    """After a sweep that a kill interrupted: every fit recorded and logged, the records that existed at the kill
    (`before`) not computed again (same computed-at times), one FINISHED run per fit and no run left RUNNING."""
    after = _records(home)
    assert len(after) == FITS and all(r["logged"] for r in after.values())
    assert {k: r["computed_at"] for k, r in before.items()} == {k: after[k]["computed_at"] for k in before}
    _one_finished_run_per_fit(uri, experiment, set(after))


def _driver_env(home: Path, uri: str | None) -> dict:
    env = dict(os.environ, FEWSOUND_HOME=str(home), PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


class RemoteServer:
    """A tracking server that fewsound did not start (not in any server.json): a user's or a cluster head's."""

    def __init__(self, store: Path):
        self.store, self.port = store, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RemoteServer:
        from fewsound.tracking import server_command

        self.store.mkdir(exist_ok=True)
        cmd = server_command(f"sqlite:///{self.store / 'mlflow.db'}", str(self.store / "artifacts"), "127.0.0.1",
                             self.port, workers=1)  # fmt: skip
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        log = open(self.store / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while not _healthy(self.uri):
            assert self.proc.poll() is None and time.monotonic() < deadline, (self.store / "server.log").read_text()
            time.sleep(0.3)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers, as the OOM killer or a crash does
            self.proc.wait()


def _kill_embedded(home: Path) -> None:
    os.killpg(json.loads((home / "server.json").read_text())["pid"], signal.SIGKILL)


@pytest.mark.system
def test_the_embedded_server_is_restarted_twice_on_its_port_then_one_line(tmp_path, monkeypatch):
    from fewsound import tracking
    from fewsound.errors import TrackingError

    home = tmp_path / "home"
    monkeypatch.setenv("FEWSOUND_HOME", str(home))  # the driver's home, whose server.json names the embedded server
    uri = tracking.start_local_server(home, port=free_port())
    root = str(tmp_path / "records")
    records.write_record(root, _record("nerf-a-abc"))  # one result waiting to be logged
    watch = TrackingWatch("t", uri, root, "sw-1", max_restarts=2)
    try:
        for restart in (1, 2):
            _kill_embedded(home)
            assert not _healthy(uri)
            watch.ensure()  # restarted on the same store and port
            assert watch.restarts == restart and _healthy(uri)
        _kill_embedded(home)
        t = time.monotonic()
        with pytest.raises(TrackingError) as e:
            watch.ensure()
        assert time.monotonic() - t < 10
        assert str(e.value).startswith(f"MLflow at {uri} is unreachable: ") and "restarted 2 times" in str(e.value)
        assert str(e.value).endswith(f"; 1 results kept in {root}/sw-1, re-run to log them")
        assert "\n" not in str(e.value)
    finally:
        tracking.stop_local_server(home)


def test_a_remote_server_that_does_not_answer_is_one_line_after_the_wait(tmp_path, monkeypatch):
    from fewsound.errors import ConfigError, TrackingError

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    root = str(tmp_path / "records")
    records.write_record(root, _record("nerf-a-abc"))
    records.write_record(root, _record("nerf-b-abc"))
    records.mark_logged(root, "sw-1", "nerf-b-abc", "run1")
    assert TrackingWatch("t", uri, root, "sw-1").wait == 20.0  # the default wait
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("FEWSOUND_TRACKING_WAIT", bad)
        with pytest.raises(ConfigError, match=f"FEWSOUND_TRACKING_WAIT: '{bad}'"):
            TrackingWatch("t", uri, root, "sw-1")
    monkeypatch.setenv("FEWSOUND_TRACKING_WAIT", "3")  # what a driver waits (the kill test below sets it too)
    watch = TrackingWatch("t", uri, root, "sw-1")
    assert watch.home is None  # not fewsound's embedded server: never restarted
    t = time.monotonic()
    with pytest.raises(TrackingError) as e:
        watch.ensure()
    assert 3.0 <= time.monotonic() - t < 15
    assert str(e.value) == (
        f"MLflow at {uri} is unreachable: ConnectionRefusedError: [Errno 111] Connection refused; "
        f"1 results kept in {root}/sw-1, re-run to log them"
    )


@pytest.mark.system
def test_a_trial_worker_and_the_embedded_server_killed_mid_sweep_are_recovered_and_nothing_is_refitted(tmp_path):
    """One sweep, two kills: a trial's Ray worker right after it recorded its first fit (Tune retries the trial; its
    new worker skips the recorded fit), then the embedded MLflow server once a fit is logged (the driver restarts it
    on its port; the trials keep their records meanwhile)."""
    from fewsound import tracking

    home = tmp_path / "home"
    uri = tracking.start_local_server(home, port=free_port())  # the embedded server the driver finds and reuses
    log = tmp_path / "driver.log"
    # one fit per pack, 2 trials of 2 packs: the killed worker's trial has a pack left to fit
    proc = _start([*DRIVER, "t-kills", str(FITS), STEPS, "1"], _driver_env(home, None), log)
    try:
        _wait_for(lambda: bool(_records(home)), proc, log)
        at_worker_kill = _records(home)
        first = next(iter(at_worker_kill.values()))
        os.kill(first["pid"], signal.SIGKILL)  # the trial's Ray worker, right after it recorded its first fit
        _wait_for(lambda: any(r["logged"] for r in _records(home).values()), proc, log)
        at_server_kill = _records(home)
        _kill_embedded(home)
        rc = proc.wait(timeout=600)
        out = log.read_text()
        print(out)
        assert rc == 0, out[-5000:]
        assert f"the embedded MLflow server at {uri} stopped" in out and "(1 of 2)" in out
        assert f"{FITS} fits: {FITS} done now, 0 already finished, 0 failed" in out
        assert json.loads((home / "server.json").read_text())["uri"] == uri and _healthy(uri)  # same port
        result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
        assert result["done"] == FITS and result["failed"] == 0
        # Tune retried the killed trial: its new worker found the recorded fit and skipped it
        retried = [p for p in result["packs"] if p["fits_skipped"]]
        assert retried and all(p["pid"] != first["pid"] for p in retried), result["packs"]
        _nothing_refitted(home, at_worker_kill, uri, "t-kills")
        _nothing_refitted(home, at_server_kill, uri, "t-kills")
    finally:
        if proc.poll() is None:
            proc.kill()
        tracking.stop_local_server(home)


@pytest.mark.system
def test_remote_server_killed_mid_sweep_is_one_line_then_a_rerun_logs_the_records_and_refits_nothing(tmp_path):
    home = tmp_path / "home"
    server = RemoteServer(tmp_path / "server").start()
    # the driver waits 5 s (not 20) for the dead server to answer again: it is not restarted before the error
    env = dict(_driver_env(home, server.uri), FEWSOUND_TRACKING_WAIT="5")
    cmd = [*DRIVER, "t-remote", str(FITS), STEPS, "4"]
    log = tmp_path / "first.log"
    proc = _start(cmd, env, log)
    try:
        _wait_for(lambda: any(r["logged"] for r in _records(home).values()), proc, log)
        server.kill()
        rc = proc.wait(timeout=600)
        ended = time.time()
        out = log.read_text()
        print(out)
        assert rc == 2, out[-5000:]
        errors = [x for x in out.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1, out[-5000:]
        # no traceback (Ray's own noise from its workers at shutdown aside) and no retry storm of trials
        assert not [x for x in out.splitlines() if ("Traceback" in x or "MlflowException" in x) and "pid=" not in x]
        assert "Retrying" not in out and "a trial crashed" not in out, out[-5000:]
        kept = _records(home)
        unlogged = [k for k, r in kept.items() if not r["logged"]]
        assert len(kept) == FITS and unlogged  # every fit computed and recorded; some wait for the server
        assert errors[0] == (
            f"error: MLflow at {server.uri} is unreachable: " + errors[0].split("unreachable: ", 1)[1]
        ) and errors[0].endswith(f"; {len(unlogged)} results kept in {home / 'records' / 't-remote'}/"
                                 f"{next(iter(kept.values()))['sweep']}, re-run to log them")  # fmt: skip
        assert ended - max(r["computed_at"] for r in kept.values()) < 60  # within a minute of the last fit

        server.start()  # the same store on the same port
        again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        print(again.stdout)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert f"[durable] logged {len(unlogged)} fit records from" in again.stdout
        assert f"{FITS} fits: {FITS} already finished, 0 to run" in again.stdout
        assert f"{FITS} fits: 0 done now, {FITS} already finished, 0 failed" in again.stdout
        _nothing_refitted(home, kept, server.uri, "t-remote")
    finally:
        if proc.poll() is None:
            proc.kill()
        server.kill()
