"""Gunicorn settings of the embedded MLflow server (`mlflow server --gunicorn-opts "--config <this file>"`).

Gunicorn loads this file in its master process and forks the worker from it, so the SQLAlchemy hook below is in
the worker that serves MLflow. It sets two SQLite pragmas on every connection of the tracking store:
- journal_mode=WAL: a commit appends to one log file instead of creating, syncing and deleting a rollback
  journal, and readers (the MLflow UI, `jobs/report.py`) never block the writers (the trials).
- synchronous=NORMAL: with WAL, commits survive the server being killed; only a power cut or OS crash may lose
  the last few. A sweep that loses them re-runs those fits on resume (they have no FINISHED run).
Together with Gunicorn's plain WSGI worker (the default Uvicorn path wraps MLflow's Flask app in an ASGI
adapter) a child run costs the server less CPU (benchmarks/mlflow_run_cost.py measures both servers).
"""

from sqlalchemy import event
from sqlalchemy.engine import Engine


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001 (SQLAlchemy's hook signature)
    if type(dbapi_connection).__module__.split(".")[0] != "sqlite3":
        return  # PostgreSQL/MySQL stores (MLFLOW_TRACKING_URI on a cluster) keep their own settings
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


worker_class = "gthread"  # a few requests at once: trials logging while the user browses the UI
threads = 4
timeout = 300  # a large artifact upload or search may take a while; the default 30 s would kill the worker
# On SIGTERM gunicorn waits up to graceful_timeout (default 30 s) for its open client connections, and a process
# whose MLflow client has talked to the server keeps its connection open (MLflow keeps its HTTP session for the
# process's life: a driver, a notebook, a test). So every such stop took the full 30 s: longer than `fewsound mlflow
# stop` waits before it kills the server, and than many schedulers' grace periods (docker stop: 10 s), which would
# kill `fewsound mlflow serve` before its final backup. Requests in flight still get these seconds to finish.
graceful_timeout = 5
# How long an idle client connection stays open (gunicorn's default: 2 s). MLflow's client keeps its connections
# for reuse, so with many trials logging at once a connection often sits idle for a few seconds between two of
# its requests, and the server closing it just as the client sends on it aborts that request ("Connection
# aborted"; benchmarks/mlflow_load.py counts such failures). Idle connections cost the gthread worker no thread.
keepalive = 75
loglevel = "warning"
