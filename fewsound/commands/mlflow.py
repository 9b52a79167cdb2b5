"""`python -m fewsound mlflow serve|secrets|status|stop`: the MLflow servers fewsound runs.

    python -m fewsound mlflow status          # the embedded server of $FEWSOUND_HOME (~/.fewsound): address, health
    python -m fewsound mlflow stop            # stop it (its runs stay; the next job starts it again)
    python -m fewsound mlflow serve --store /home/ray/mlflow/mlflow.db --backup s3://bucket/fewsound/mlflow.db \\
        --artifacts s3://bucket/fewsound/mlflow-artifacts --host 0.0.0.0 --port 5000 --app-name basic-auth \\
        --credentials ~/.mlflow/credentials --flask-secret ~/.fewsound/mlflow_flask_secret \\
        --allowed-hosts "10.0.1.5:5000,localhost:*,127.0.0.1:*"
    python -m fewsound mlflow secrets         # on the laptop, once: the files `ray up` copies (cluster.yaml)

`serve` is the cluster's server, its history backed up to shared storage: see fewsound/mlflow_server.py for what
it does (restore at start, periodic and final online backups). The embedded server is the one every job starts on
first use (fewsound.tracking.start_local_server) and leaves running so that its UI stays open.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="mlflow_command", metavar="ACTION", required=True)
    s = sub.add_parser("serve", help="run an MLflow tracking server whose SQLite store is backed up and restored")
    s.add_argument(
        "--store",
        required=True,
        help="the SQLite file (created if missing), or a database URI such as postgresql://... (no backup)",
    )
    s.add_argument(
        "--backup",
        default=None,
        help="where the SQLite file is backed up and restored from (s3://..., gs://..., a shared path)",
    )
    s.add_argument("--artifacts", required=True, help="where the server keeps artifacts (s3://..., a folder)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    s.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    s.add_argument("--backup-every", type=float, default=10.0, help="minutes between backups (default 10)")
    s.add_argument("--app-name", default=None, help="MLflow server app, e.g. basic-auth (logins; README)")
    s.add_argument("--credentials", default=None, help="basic-auth: MLflow credentials file with the admin login")
    s.add_argument("--flask-secret", default=None, help="basic-auth: file holding the Flask secret key")
    s.add_argument(
        "--allowed-hosts",
        default=None,
        help="Host header values the server answers, comma-separated, * wildcards (MLFLOW_SERVER_ALLOWED_HOSTS)",
    )
    k = sub.add_parser("secrets", help="create the cluster server's login and Flask key files (kept if present)")
    k.add_argument("--dir", type=Path, default=None, help="where (default ~/.fewsound/cluster, as cluster.yaml)")
    for action, what in (("status", "show"), ("stop", "stop")):
        a = sub.add_parser(action, help=f"{what} the embedded MLflow server that jobs start ($FEWSOUND_HOME)")
        a.add_argument("--home", type=Path, default=None, help="its folder (default $FEWSOUND_HOME or ~/.fewsound)")


def run(args: argparse.Namespace) -> int:
    if args.mlflow_command == "status":
        return _status(args.home)
    if args.mlflow_command == "stop":
        return _stop(args.home)
    if args.mlflow_command == "secrets":
        return _secrets(args.dir)
    from fewsound.mlflow_server import serve

    return serve(
        args.store,
        artifacts=args.artifacts,
        backup=args.backup,
        host=args.host,
        port=args.port,
        workers=args.workers,
        backup_minutes=args.backup_every,
        app_name=args.app_name,
        allowed_hosts=args.allowed_hosts,
        credentials=args.credentials,
        flask_secret=args.flask_secret,
        log=lambda m: print(m, flush=True),
    )


def _secrets(folder: Path | None) -> int:
    from fewsound.mlflow_server import CREDENTIALS_FILE, SECRETS_DIR, make_secrets

    folder = (folder or SECRETS_DIR).expanduser()
    made = make_secrets(folder)
    for path in made:
        print(f"wrote {path} (mode 600)")
    if not made:
        print(f"kept the files in {folder} (they exist; delete them to make new ones)")
    print(f"`ray up cluster.yaml` copies them to every node; the MLflow UI's login is in {folder / CREDENTIALS_FILE}")
    return 0


def _status(home: Path | None) -> int:
    """Exit 0 when the server answers, 1 when none is running (so scripts can test it)."""
    from fewsound.tracking import local_server_status

    st = local_server_status(home)
    if st["healthy"]:
        print(f"MLflow server running at {st['uri']} (pid {st['pid']}); open it in a browser to compare runs")
    elif st["running"]:
        print(f"MLflow server process {st['pid']} is running but {st['uri']} does not answer; see {st['log']}")
    else:
        print("no MLflow server running for this home; the next job starts one")
    print(f"  store      {st['store']} ({st['store_mb']} MB)")
    print(f"  artifacts  {st['artifacts']}")
    print(f"  log        {st['log']}")
    return 0 if st["healthy"] else 1


def _stop(home: Path | None) -> int:
    from fewsound.tracking import local_server_status, stop_local_server

    st = local_server_status(home)
    if stop_local_server(home):
        print(f"stopped the MLflow server at {st['uri']} (pid {st['pid']}); its runs stay in {st['store']}")
    else:
        print("no MLflow server was running for this home")
    return 0
