"""fewsound.mlflow_server: SQLite online backups to object storage and restore at start (real SQLite, real moto
S3 server). The whole server cycle (sweep, stop, delete, restore, re-run skips) is in test_s3.py."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from fewsound import storage
from fewsound.errors import ConfigError
from fewsound.mlflow_server import Backups, restore, serve, sqlite_path
from fewsound.tracking import server_command

BACKUP = "s3://fewsound/fewsound/mlflow.db"


def _rows(db) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute("select k, v from t order by k").fetchall()


def test_backup_while_writing_then_restore_into_a_new_head(s3, tmp_path):
    db = tmp_path / "head1" / "mlflow.db"
    db.parent.mkdir()
    con = sqlite3.connect(db)
    con.execute("pragma journal_mode=wal")  # as the server runs it (fewsound/mlflow_gunicorn.py)
    con.execute("create table t (k integer primary key, v text)")
    con.commit()
    stop = threading.Event()
    committed = [0]  # rows the writer has committed
    progress = threading.Condition()

    def writer() -> None:  # a second connection keeps committing while the backups are taken
        w = sqlite3.connect(db)
        i = 1000
        while not stop.is_set():
            w.execute("insert into t values (?, ?)", (i, "w" * 100))
            w.commit()
            i += 1
            with progress:
                committed[0] += 1
                progress.notify_all()
        w.close()

    def wait_for(n: int) -> None:  # the writer's own signal, not a sleep
        with progress:
            assert progress.wait_for(lambda: committed[0] >= n, timeout=60), committed[0]

    for k in range(200):
        con.execute("insert into t values (?, ?)", (k, f"run-{k}"))
    con.commit()
    thread = threading.Thread(target=writer)
    thread.start()
    log: list[str] = []
    backups = Backups(db, BACKUP, every_s=3600, log=log.append)
    try:
        wait_for(1)  # the writer is committing
        assert backups.now()
        wait_for(committed[0] + 1)  # ... and went on after the backup: it was taken mid-stream
    finally:
        stop.set()
        thread.join()
    # the backup taken during the writes, restored before anything overwrites it: a consistent database with
    # every row committed before it began and an unbroken run of the writer's rows (a committed prefix)
    during = tmp_path / "head-during" / "mlflow.db"
    assert restore(during, BACKUP)
    with sqlite3.connect(during) as c:
        assert c.execute("pragma integrity_check").fetchone() == ("ok",)
    rows = _rows(during)
    assert rows[:200] == [(k, f"run-{k}") for k in range(200)]
    written = [k for k, _ in rows[200:]]
    assert written == list(range(1000, 1000 + len(written))) and 1 <= len(written) < committed[0], len(written)

    assert backups.now()  # the writer added rows: a new snapshot is uploaded
    assert not backups.now() and len(log) == 2  # nothing changed since: no upload
    assert "fewsound/mlflow.db" in s3.keys("fewsound")

    fresh = tmp_path / "head2" / "mlflow.db"  # `ray down` / `ray up`: a new disk
    assert restore(fresh, BACKUP)
    assert _rows(fresh) == _rows(db)  # the last backup holds every committed row, consistent
    with sqlite3.connect(fresh) as c:
        assert c.execute("pragma integrity_check").fetchone() == ("ok",)
    assert not restore(fresh, BACKUP)  # an existing store is never overwritten
    assert not restore(tmp_path / "head3" / "mlflow.db", "s3://fewsound/none.db")  # no backup yet: a new store
    con.close()


def test_periodic_backups_run_in_the_background(s3, tmp_path):
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as c:
        c.execute("create table t (k integer primary key, v text)")
    done = threading.Event()
    backups = Backups(db, BACKUP, every_s=0.2, log=lambda m: done.set())
    backups.start()
    try:
        assert done.wait(30)
    finally:
        backups.stop()
    assert storage.size(BACKUP) == db.stat().st_size


def test_store_kinds_and_bad_options(tmp_path):
    assert sqlite_path(str(tmp_path / "m.db")) == tmp_path / "m.db"
    assert sqlite_path(f"sqlite:///{tmp_path}/m.db") == tmp_path / "m.db"
    assert sqlite_path("postgresql://mlflow@db.internal/mlflow") is None
    with pytest.raises(ConfigError, match="database server"):
        serve("postgresql://mlflow@db.internal/mlflow", artifacts=str(tmp_path), backup=BACKUP)
    with pytest.raises(ConfigError, match="--backup-every"):
        serve(str(tmp_path / "m.db"), artifacts=str(tmp_path), backup=BACKUP, backup_minutes=0)
    cmd = server_command("sqlite:////x/m.db", "s3://b/a", "0.0.0.0", 5000, 2, "basic-auth")
    assert cmd[1:4] == ["server", "--backend-store-uri", "sqlite:////x/m.db"]
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://b/a" and "--serve-artifacts" in cmd
    assert cmd[-2:] == ["--app-name", "basic-auth"]
