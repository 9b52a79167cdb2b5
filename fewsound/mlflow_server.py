"""A cluster's MLflow tracking server whose history outlives the machine it runs on.

The head node of a Ray cluster keeps MLflow's SQLite store on its own disk, and `ray down` deletes that disk.
`serve` wraps `mlflow server` so that the store survives:

1. restore: when the local SQLite file is missing (a fresh head after `ray down`/`ray up`) and a backup exists
   at the backup URI (e.g. s3://bucket/fewsound/mlflow.db), download it first;
2. run `mlflow server` on the store, artifacts proxied to shared storage (--artifacts-destination);
3. back the store up every N minutes and once more when stopped (SIGTERM/SIGINT), with SQLite's online backup
   API (`sqlite3.Connection.backup`): a consistent snapshot even while the server writes, taken to a local
   temporary file and uploaded whole (fewsound.storage.write_bytes), so the backup object is never half-written.
   A snapshot identical to the last upload is not uploaded again.

What a crash between two backups loses is the runs of the last N minutes; resume-by-key (sweeps skip fits with a
FINISHED run) re-runs exactly those. For no loss at all, use a database server instead: pass a PostgreSQL URI as
the store (`--store postgresql://user@host/mlflow`), which `serve` hands to MLflow as is, with no backup.

    python -m fewsound mlflow serve --store /home/ray/mlflow/mlflow.db --backup s3://bucket/fewsound/mlflow.db \\
        --artifacts s3://bucket/fewsound/mlflow-artifacts --host 0.0.0.0 --port 5000
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import tempfile
import threading
from pathlib import Path

from fewsound import storage
from fewsound.errors import ConfigError
from fewsound.tracking import server_command


def sqlite_path(store: str) -> Path | None:
    """The SQLite file of a store given as a path or sqlite:/// URI; None for a database server URI."""
    if store.startswith("sqlite:///"):
        return Path(store[len("sqlite:///") :])
    if storage.is_uri(store) or "://" in store:
        return None  # postgresql://, mysql://, ...: the database server keeps the history
    return Path(store).expanduser().resolve()


def restore(db: Path, backup: str) -> bool:
    """Download `backup` to `db` when `db` is missing and the backup exists. True if it restored."""
    if db.exists() or not storage.exists(backup):
        return False
    storage.download_file(backup, db)
    return True


def snapshot(db: Path) -> bytes:
    """A consistent copy of the SQLite database `db` (online backup: the server may be writing meanwhile)."""
    with tempfile.TemporaryDirectory(dir=db.parent) as d:
        copy = Path(d) / db.name
        src = sqlite3.connect(db)  # only read: the backup API copies pages under a read transaction
        dst = sqlite3.connect(copy)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        return copy.read_bytes()


class Backups:
    """Uploads snapshots of `db` to `backup`: `now()` on demand, or every `every_s` seconds in a thread."""

    def __init__(self, db: Path, backup: str, every_s: float, log=print):
        self.db, self.backup, self.every_s, self.log = db, backup, every_s, log
        self._last: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-backup", daemon=True)

    def now(self) -> bool:
        """Back up now; False when there is nothing new (no store yet, or the same bytes as the last upload)."""
        with self._lock:
            if not self.db.exists():
                return False
            data = snapshot(self.db)
            digest = hashlib.sha256(data).hexdigest()
            if digest == self._last:
                return False
            storage.write_bytes(self.backup, data)
            self._last = digest
            self.log(f"backed up {self.db} to {self.backup} ({len(data) / 1e6:.1f} MB)")
            return True

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.now()
            except Exception as e:  # noqa: BLE001 - a failed periodic backup is retried next period
                self.log(f"backup to {self.backup} failed ({type(e).__name__}: {e}); retrying in {self.every_s:.0f} s")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def serve(store: str, *, artifacts: str, backup: str | None = None, host: str = "127.0.0.1", port: int = 5000,
          workers: int = 2, backup_minutes: float = 10.0, app_name: str | None = None, log=print) -> int:  # fmt: skip
    """Restore, run `mlflow server` until it exits or this process gets SIGTERM/SIGINT, backing up meanwhile and
    at the end. Returns the exit code (0 after a signal)."""
    db = sqlite_path(store)
    if db is None and backup:
        raise ConfigError("--backup", f"the store {store} is a database server; it keeps the history itself")
    if backup_minutes <= 0:
        raise ConfigError("--backup-every", f"must be > 0 minutes, got {backup_minutes}")
    backups = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        if backup:
            if restore(db, backup):
                log(f"restored {db} from {backup}")
            backups = Backups(db, backup, backup_minutes * 60, log)
        store = f"sqlite:///{db}"
    if storage.is_local(artifacts):
        artifacts = storage.normalize(artifacts)
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no GenAI job runner (see tracking.py)
    cmd = server_command(store, artifacts, host, port, workers, app_name)
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    log(f"mlflow server pid {proc.pid} on {host}:{port}, store {store}, artifacts {artifacts}"
        + (f", backup {backup} every {backup_minutes:g} min" if backups else ""))  # fmt: skip

    stopping = threading.Event()

    def on_signal(signum, _frame) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if backups:
        backups.start()
    while proc.poll() is None and not stopping.is_set():
        stopping.wait(1.0)
    if proc.poll() is None:  # stopped by a signal: end the server's whole process group (gunicorn + workers)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if backups:
        backups.stop()
        backups.now()  # the last commits the server made before it stopped
    code = 0 if stopping.is_set() else (proc.returncode or 0)
    log(f"mlflow server stopped (exit code {proc.returncode})")
    return code
