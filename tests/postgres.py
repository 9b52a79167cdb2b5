"""A real PostgreSQL server for tests and benchmarks: its own cluster (`initdb`) in a temporary folder, `postgres`
on 127.0.0.1 and a free port, stopped and deleted at the end. Nothing depends on a system service.

    with LocalPostgres(Path("/tmp/x.log")) as pg:
        pg.uri("mlflow")         postgresql://fewsound@127.0.0.1:PORT/mlflow (the database is created)
        pg.pids()                the server's processes (the postmaster and its backends), for CPU accounting

The server binaries come from Debian's `postgresql` package (scripts/ensure_postgres.sh installs it; CI runs
that): they live in /usr/lib/postgresql/<version>/bin, which is not on PATH, so they are looked up there too.
PostgreSQL refuses to run as root: as root, the cluster belongs to (and the server runs as) the package's
`postgres` user. Connections from 127.0.0.1 are trusted (no password): the server listens on nothing else.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("initdb", "postgres")
USER = "fewsound"  # the database superuser of the temporary cluster


class PostgresMissing(RuntimeError):
    """PostgreSQL's server binaries are not installed (one line: what to install)."""


def bindir() -> Path:
    """The folder holding `initdb` and `postgres`: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=lambda p: int(Path(p).parent.name.split(".")[0]))[::-1]]
    for d in candidates:
        if all((d / b).exists() for b in BINARIES):
            return d
    raise PostgresMissing(
        "PostgreSQL's server binaries (initdb, postgres) were not found on PATH or in /usr/lib/postgresql/*/bin: "
        "install Debian's postgresql package (bash scripts/ensure_postgres.sh, or apt-get install postgresql)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """A private PostgreSQL cluster. `durable=False` (tests) turns fsync off: faster, and nothing outlives the
    test anyway; `durable=True` (the benchmark) keeps PostgreSQL's defaults (every commit flushed to disk)."""

    def __init__(self, log: Path, durable: bool = False, timeout: float = 60.0):
        self.log_path, self.durable, self.timeout = Path(log), durable, timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.root: Path | None = None

    def _as_owner(self) -> dict:
        """Popen arguments that run a command as the cluster's owner: `postgres` when this process is root."""
        if os.geteuid() != 0:
            return {}
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresMissing(
                "running as root, and there is no `postgres` user to run the server as (PostgreSQL refuses root): "
                "install Debian's postgresql package, which creates it"
            ) from None
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def __enter__(self) -> LocalPostgres:
        bins = bindir()
        owner = self._as_owner()
        # not under pytest's tmp_path: its parent folder is private to this user, and the owner may be another
        self.root = Path(tempfile.mkdtemp(prefix="fewsound-pg-"))
        if owner:
            os.chown(self.root, owner["user"], owner["group"])
        data = self.root / "data"
        init = subprocess.run(
            [str(bins / "initdb"), "-D", str(data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True, cwd=self.root, **owner,
        )  # fmt: skip
        if init.returncode != 0:
            self._cleanup()
            raise RuntimeError(f"initdb failed (exit {init.returncode}): {(init.stdout + init.stderr)[-2000:]}")
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.root),  # not /var/run/postgresql: that may not exist or be ours
            "max_connections": "300",  # gunicorn workers x SQLAlchemy pool (5 + 10 overflow) each, with room
            "shared_buffers": "128MB",
        }
        if not self.durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        for _attempt in range(3):  # a free port can be taken before the server binds it: retry
            self.port = _free_port()
            args = [str(bins / "postgres"), "-D", str(data), "-p", str(self.port)]
            for k, v in settings.items():
                args += ["-c", f"{k}={v}"]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                             start_new_session=True, **owner)  # fmt: skip
            if self._wait_ready():
                self._create_database("mlflow")
                return self
            if "already in use" not in self.log_path.read_text(errors="replace")[-3000:]:
                break
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.__exit__()
        raise RuntimeError(f"postgres did not start on 127.0.0.1:{self.port}: {tail}")

    def _wait_ready(self) -> bool:
        import psycopg

        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.2)
        return False

    def dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} dbname={database}"

    def uri(self, database: str = "mlflow") -> str:
        """The SQLAlchemy URI of `database` (what `mlflow server --backend-store-uri` takes)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _create_database(self, name: str) -> None:
        import psycopg

        # autocommit: CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def pids(self) -> list[int]:
        """The postmaster and every process it runs (backends, WAL writer, checkpointer, ...)."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return []
        main = psutil.Process(self.proc.pid)
        return [main.pid, *(p.pid for p in main.children(recursive=True))]

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: ends sessions, checkpoints, exits
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
