"""`python -m fewsound mlflow serve ...`: the cluster's MLflow server, its history backed up to shared storage.

    python -m fewsound mlflow serve --store /home/ray/mlflow/mlflow.db --backup s3://bucket/fewsound/mlflow.db \\
        --artifacts s3://bucket/fewsound/mlflow-artifacts --host 0.0.0.0 --port 5000

See fewsound/mlflow_server.py for what it does (restore at start, periodic and final online backups).
"""

from __future__ import annotations

import argparse


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


def run(args: argparse.Namespace) -> int:
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
        log=lambda m: print(m, flush=True),
    )
