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

Logins (`--app-name basic-auth`, what cluster.yaml runs): MLflow's own authentication app. Its secrets come from
two files that `python -m fewsound mlflow secrets` creates on the user's machine and `ray up` copies to every node
(cluster.yaml's file_mounts), never from the command line or cluster.yaml:
- the MLflow credentials file (`--credentials`, MLflow's own format: `[mlflow]` with `mlflow_tracking_username`
  and `mlflow_tracking_password`), mounted at ~/.mlflow/credentials, where every MLflow client on the node (jobs,
  trials) reads its login; the server makes that user its admin on a fresh auth store;
- the Flask secret key (`--flask-secret`), which signs the auth app's CSRF tokens.
`serve` writes MLflow's auth settings file (MLFLOW_AUTH_CONFIG_PATH, no secret in it) next to the store and
hands the admin login and the Flask key to the server in its environment. The auth store (users, permissions) is
a SQLite file next to the tracking store and is NOT backed up to the bucket: a bucket that others can write must
not be able to plant a user; on a fresh head the admin is made again from the credentials file.
`--allowed-hosts` (MLflow's MLFLOW_SERVER_ALLOWED_HOSTS: the Host header values it answers, e.g. the head's
private address and localhost) refuses requests addressed to any other name (DNS rebinding).

    python -m fewsound mlflow serve --store /home/ray/mlflow/mlflow.db --backup s3://bucket/fewsound/mlflow.db \\
        --artifacts s3://bucket/fewsound/mlflow-artifacts --host 0.0.0.0 --port 5000 --app-name basic-auth \\
        --credentials ~/.mlflow/credentials --flask-secret ~/.fewsound/mlflow_flask_secret \\
        --allowed-hosts "10.0.1.5:5000,localhost:*,127.0.0.1:*"
"""

from __future__ import annotations

import configparser
import hashlib
import os
import secrets
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


# --------------------------------------------------------------------------------------------- logins

SECRETS_DIR = Path("~/.fewsound/cluster")
CREDENTIALS_FILE = "mlflow_credentials"
FLASK_SECRET_FILE = "mlflow_flask_secret"
ADMIN_USER = "admin"
AUTH_APP = "basic-auth"


def make_secrets(folder: str | Path = SECRETS_DIR, username: str = ADMIN_USER) -> list[Path]:
    """Create `folder` (mode 0700) with the cluster server's two secret files (mode 0600), each from 32 random
    bytes (secrets.token_urlsafe): CREDENTIALS_FILE (MLflow's credentials-file format) and FLASK_SECRET_FILE.
    A file that exists is kept (a running cluster's login stays valid). Returns the files created."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    contents = {
        CREDENTIALS_FILE: f"[mlflow]\nmlflow_tracking_username = {username}\n"
        f"mlflow_tracking_password = {secrets.token_urlsafe(32)}\n",
        FLASK_SECRET_FILE: secrets.token_urlsafe(32) + "\n",
    }
    made = []
    for name, text in contents.items():
        path = folder / name
        try:  # O_EXCL: never overwrite; 0600 from the start, so the secret is never readable by others
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            f.write(text)
        made.append(path)
    return made


def read_credentials(path: str | Path) -> tuple[str, str]:
    """(username, password) of an MLflow credentials file (`[mlflow]` mlflow_tracking_username/_password)."""
    path = Path(path).expanduser()
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text())
        user, word = parser["mlflow"]["mlflow_tracking_username"], parser["mlflow"]["mlflow_tracking_password"]
    except (OSError, configparser.Error, KeyError) as e:
        raise ConfigError(path, f"not a readable MLflow credentials file ({type(e).__name__}); create it with "
                          "`python -m fewsound mlflow secrets`") from None  # fmt: skip
    if not user.strip() or not word.strip():
        raise ConfigError(path, "empty mlflow_tracking_username or mlflow_tracking_password")
    return user.strip(), word.strip()


def read_secret(path: str | Path) -> str:
    """The one-line secret in `path` (the Flask key file)."""
    path = Path(path).expanduser()
    try:
        value = path.read_text().strip()
    except OSError as e:
        why = f"unreadable ({type(e).__name__}); create it with `python -m fewsound mlflow secrets`"
        raise ConfigError(path, why) from None
    if len(value) < 16:
        raise ConfigError(path, "the secret is empty or shorter than 16 characters")
    return value


def auth_environment(credentials: str | Path | None, flask_secret: str | Path | None, auth_db: Path) -> dict[str, str]:
    """The environment of an `mlflow server --app-name basic-auth`: its settings file (written next to
    `auth_db`, without secrets), the admin login from `credentials` and the Flask key from `flask_secret`."""
    if credentials is None or flask_secret is None:
        raise ConfigError("--app-name basic-auth", "needs --credentials and --flask-secret (files; README)")
    user, word = read_credentials(credentials)
    key = read_secret(flask_secret)
    auth_db.parent.mkdir(parents=True, exist_ok=True)
    ini = auth_db.with_suffix(".ini")
    # READ for users the admin adds; jobs log as the admin. No admin_password here: it comes in the environment.
    ini.write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{auth_db}\nadmin_username = {user}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": word,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": key}  # fmt: skip


# --------------------------------------------------------------------------------------------- the server


def server_environment(app_name: str | None, db: Path | None, allowed_hosts: str | None,
                       credentials: str | Path | None, flask_secret: str | Path | None) -> dict[str, str]:  # fmt: skip
    """The `mlflow server` process's environment: no GenAI job runner, the allowed Host headers, the logins."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no GenAI job runner (see tracking.py)
    if allowed_hosts:
        # the variable, not --allowed-hosts: MLflow refuses that flag with --gunicorn-opts, while its Flask app
        # (which gunicorn serves) applies the variable
        env["MLFLOW_SERVER_ALLOWED_HOSTS"] = allowed_hosts
    if app_name == AUTH_APP:
        auth_db = (db.parent if db is not None else Path.cwd()) / "basic_auth.db"
        env.update(auth_environment(credentials, flask_secret, auth_db))
    elif credentials or flask_secret:
        raise ConfigError("--credentials/--flask-secret", f"are for --app-name {AUTH_APP}")
    return env


def serve(store: str, *, artifacts: str, backup: str | None = None, host: str = "127.0.0.1", port: int = 5000,
          workers: int = 2, backup_minutes: float = 10.0, app_name: str | None = None,
          allowed_hosts: str | None = None, credentials: str | Path | None = None,
          flask_secret: str | Path | None = None, log=print) -> int:  # fmt: skip
    """Restore, run `mlflow server` until it exits or this process gets SIGTERM/SIGINT, backing up meanwhile and
    at the end. Returns the exit code (0 after a signal). With app_name "basic-auth", `credentials` and
    `flask_secret` (files) give the admin login and the Flask key (see the module docstring)."""
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
    env = server_environment(app_name, db, allowed_hosts, credentials, flask_secret)
    cmd = server_command(store, artifacts, host, port, workers, app_name)
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    log(f"mlflow server pid {proc.pid} on {host}:{port}, store {store}, artifacts {artifacts}"
        + (f", backup {backup} every {backup_minutes:g} min" if backups else "")
        + (f", logins ({app_name})" if app_name else "")
        + (f", hosts {allowed_hosts}" if allowed_hosts else ""))  # fmt: skip

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
