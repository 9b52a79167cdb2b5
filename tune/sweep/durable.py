"""Logging a fit is a replay of its record, and the tracking server is watched: nothing computed is lost.

A trial writes every finished fit to the sweep's storage (fewsound.records) before it logs it; `replay` turns a
record into its MLflow child run and may run any number of times: at once in the trial, in the driver when the
server is back, in a re-run of the same command. MLflow does not let a client choose a run's id, so a replay
first looks for the fit's runs by their tags (fit key, sweep, and the record's stamp):
- a complete run of this record (FINISHED/FAILED as recorded; any FINISHED run of the key for a FINISHED
  record) means it is logged already: the record is marked logged, nothing is created;
- a run left RUNNING by a process that died while logging is ended KILLED, and a fresh run is logged;
so a fit ends with exactly one FINISHED run whatever was killed when. Once a run is complete, the record's files
are removed from the sweep's storage (fewsound.records.release_files): the run's artifacts are their one durable
copy. A clip's target audio is logged once per sweep on the parent run (`replay_targets`, before the fits that
reference it: tag TARGET_AUDIO_TAG (tune.spine), an artifact path of the run's parent).

The server's health is one GET /health with a short timeout (MLflow's client retries for minutes before it gives
up, far too long for a sweep to wait on). `TrackingWatch` is the driver's view of it: the embedded server (the
one recorded in $FEWSOUND_HOME/server.json) is restarted on the same store and port when it died, a few times;
a server someone else runs is only reported. When the server stays down, the driver ends with one line naming
it and where the results wait (TrackingError), and the next run of the same command logs them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

from fewsound import records, storage, tracking
from fewsound.errors import FewsoundError, Stopped, TrackingError
from fewsound.records import FitRecord
from tune.spine import FIT_KEY_TAG, RECORD_TAG, SWEEP_TAG, env_number, runs_by_tag, search_runs, tag_filter

TARGETS_DIR = "targets"  # the parent run's artifact folder of the sweep's targets
LOG_THREADS = 4  # runs logged at once (each mostly waits on the server)
HEALTH_TIMEOUT = 5.0  # seconds for GET /health (a loaded server answers it in milliseconds)
WAIT_ENV, WAIT_DEFAULT = "FEWSOUND_TRACKING_WAIT", 20.0  # how long a server fewsound did not start is waited for
# MLflow's documented client settings, as defaults (a user's values win): by default its client retries a failed
# request 7 times with exponential backoff (minutes); a record waits safely instead, so fail fast.
CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


def client_defaults() -> None:
    for k, v in CLIENT_ENV.items():
        os.environ.setdefault(k, v)


def stamp(rec: FitRecord) -> str:
    return f"{rec.computed_at:.6f}"


def runs_by_key(client: Any, exp_id: str, filter_string: str) -> dict[str, list[Any]]:
    """{fit key: its runs} of the runs matching `filter_string` (every page)."""
    return runs_by_tag(search_runs(client, exp_id, filter_string), FIT_KEY_TAG)


def replay(
    client: Any, exp_id: str, root: str, rec: FitRecord, parent_run_id: str, runs: list[Any]
) -> tuple[str, bool]:
    """Log `rec` as one child run of `parent_run_id` unless it is logged already (see the module docstring);
    `runs`: the fit's runs in this sweep. Marks the record logged. Returns (run id, whether a run was created)."""
    from fewsound.tracking import PARENT_TAG, log_run

    mine = stamp(rec)
    for r in runs:
        same = r.data.tags.get(RECORD_TAG) == mine or rec.status == "FINISHED"
        if r.info.status == rec.status and same:
            records.mark_logged(root, rec.sweep, rec.key, r.info.run_id)
            records.release_files(root, rec.sweep, rec.key, rec.artifacts)
            return r.info.run_id, False
    for r in runs:
        if r.info.status == "RUNNING":  # a logger died while it logged this fit
            client.set_terminated(r.info.run_id, status="KILLED")
    tags = dict(rec.tags, **{PARENT_TAG: parent_run_id, RECORD_TAG: mine})
    run_id = log_run(
        client,
        exp_id,
        run_name=rec.run_name,
        tags=tags,
        params=rec.params,
        metrics=rec.metrics,
        curves=rec.curves,
        status="RUNNING" if rec.artifacts else rec.status,  # FINISHED only once its files are there
    )
    if rec.artifacts:
        with tempfile.TemporaryDirectory() as d:
            folder = records.artifacts_folder(root, rec.sweep, rec.key, rec.artifacts, Path(d))
            if any(p.is_file() for p in folder.rglob("*")):
                client.log_artifacts(run_id, str(folder))
            else:  # released to a run the tracking store has lost since (e.g. restored from an older backup)
                client.set_tag(
                    run_id, "fewsound.artifacts", f"lost with run {records.logged_run(root, rec.sweep, rec.key)}"
                )
        client.set_terminated(run_id, status=rec.status)
    records.mark_logged(root, rec.sweep, rec.key, run_id)
    records.release_files(root, rec.sweep, rec.key, rec.artifacts)
    return run_id, True


def replay_targets(client: Any, root: str, sweep: str, parent_run_id: str, names: set[str] | None = None) -> int:
    """Log the sweep's pending targets (those of `names` only, when given) on the parent run under TARGETS_DIR,
    each then removed from the sweep's storage. Idempotent: two processes logging the same target write the same
    bytes to the same artifact path. Returns how many were logged.

    With `names` (a pack's targets) each is looked up by name rather than by listing every target of the sweep,
    which a trial would do once per pack; the listing (names=None, the driver's) also removes files left by a
    process that died between `records.target_logged`'s two steps."""
    if names is None:
        pending = records.pending_targets(root, sweep)
    else:
        pending = sorted(n for n in names if not records.target_is_logged(root, sweep, n))
    done = 0
    with tempfile.TemporaryDirectory() as d:
        for name in pending:
            try:
                storage.download_file(records.target_path(root, sweep, name), Path(d) / name)
            except FileNotFoundError:  # another process logged it meanwhile
                continue
            client.log_artifact(parent_run_id, str(Path(d) / name), TARGETS_DIR)
            records.target_logged(root, sweep, name, parent_run_id)
            done += 1
    return done


def replay_pending(client: Any, exp_id: str, root: str, sweep: str, parent_run_id: str, missing: set[str]) -> int:
    """Log every record of `sweep` not yet logged (kept while the server was down, or by a process that died
    before it logged them), and again those of `missing`, keys without a FINISHED run (e.g. a tracking store
    restored from an older backup): a record is never refitted. The pending targets go first (`replay_targets`).
    Returns how many runs were created."""
    replay_targets(client, root, sweep, parent_run_id)
    pending = [k for k, logged in records.scan(root, sweep).items() if not logged or k in missing]
    if not pending:
        return 0
    runs = runs_by_key(client, exp_id, tag_filter(SWEEP_TAG, sweep))

    def one(key: str) -> bool:
        rec = records.read_record(root, sweep, key)
        assert rec is not None, key  # committed records are never removed
        return replay(client, exp_id, root, rec, parent_run_id, runs.get(key, []))[1]

    with ThreadPoolExecutor(max_workers=LOG_THREADS) as pool:
        return sum(pool.map(one, pending))


def kept_count(root: str, sweep: str) -> int:
    """Records of the sweep not logged yet."""
    try:
        return sum(not logged for logged in records.scan(root, sweep).values())
    except OSError:
        return 0


def wait_seconds() -> float:
    """$FEWSOUND_TRACKING_WAIT: seconds a driver waits for a tracking server it did not start to answer again
    before it ends with one line (default 20). ConfigError, naming the variable, on anything but a number >= 0."""
    value = env_number(WAIT_ENV)
    return WAIT_DEFAULT if value is None else value


class TrackingWatch:
    """The driver's view of the tracking server: `poll()` between packs, `ensure()` before the driver talks to
    MLflow. The embedded server (`tracking.local_server_home`) is restarted on its store and port up to
    `max_restarts` times; any other server is waited for up to `wait` seconds (None: $FEWSOUND_TRACKING_WAIT, else
    20), then reported."""

    def __init__(self, name: str, uri: str, root: str, sweep: str, max_restarts: int = 2, wait: float | None = None):
        self.name, self.uri, self.root, self.sweep = name, uri, root, sweep
        self.home = tracking.local_server_home(uri)
        self.max_restarts, self.wait = max_restarts, wait_seconds() if wait is None else wait
        self.restarts = 0
        self.last_poll = 0.0
        self.reported_down = False

    @property
    def where(self) -> str:
        return storage.join(self.root, self.sweep)

    def poll(self, every: float = 10.0) -> None:
        """At most every `every` seconds: restart the embedded server if it died (trials keep their records while
        it is down); say once that a remote one is down."""
        if time.monotonic() - self.last_poll < every:
            return
        self.last_poll = time.monotonic()
        reason = tracking.server_health(self.uri, HEALTH_TIMEOUT)
        if reason is None:
            self.reported_down = False
            return
        if self.home is not None and self.restarts < self.max_restarts:
            self._restart(reason)
        elif not self.reported_down:
            self.reported_down = True
            print(f"[{self.name}] MLflow at {self.uri} is unreachable ({reason}); the trials keep their results in "
                  f"{self.where}", flush=True)  # fmt: skip

    def answers(self) -> bool:
        return tracking.server_health(self.uri, HEALTH_TIMEOUT) is None

    def ensure(self) -> None:
        """Return once the server answers; else restart the embedded one, or wait for another one up to `wait`
        seconds; then raise TrackingError (one line: the server, why, how many results wait where)."""
        reason = tracking.server_health(self.uri, HEALTH_TIMEOUT)
        deadline = time.monotonic() + self.wait
        while reason is not None:
            if self.home is not None and self.restarts < self.max_restarts:
                reason = self._restart(reason)
                continue
            if self.home is not None or time.monotonic() > deadline:
                self.fail(reason)
            time.sleep(2.0)
            reason = tracking.server_health(self.uri, HEALTH_TIMEOUT)

    def fail(self, reason: str) -> NoReturn:
        if self.home is not None:
            reason = f"{reason} (the embedded server was restarted {self.restarts} times; log: {self.home}/server.log)"
        n = kept_count(self.root, self.sweep)
        raise TrackingError(
            f"MLflow at {self.uri} is unreachable", f"{reason}; {n} results kept in {self.where}, re-run to log them"
        )

    def _restart(self, reason: str) -> str | None:
        assert self.home is not None
        self.restarts += 1
        print(f"[{self.name}] the embedded MLflow server at {self.uri} stopped ({reason}); restarting it on the "
              f"same store and port ({self.restarts} of {self.max_restarts})", flush=True)  # fmt: skip
        try:
            tracking.restart_local_server(self.uri, self.home)
        except Exception as e:
            return f"restart failed: {type(e).__name__}: {e}"[:300]
        return tracking.server_health(self.uri, HEALTH_TIMEOUT)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around the driver's MLflow calls: an error while the server is down becomes the one-line
        TrackingError instead of MLflow's traceback."""
        try:
            yield
        except (FewsoundError, Stopped):  # a one-line error already, or a signal's clean stop
            raise
        except Exception:
            reason = tracking.server_health(self.uri, HEALTH_TIMEOUT)
            if reason is None:
                raise
            self.fail(reason)
