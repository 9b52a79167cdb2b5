"""MLflow, behind one small adapter (and a no-op logger with the same methods).

The embedded default is a real MLflow tracking server on 127.0.0.1 over a SQLite file with proxied artifacts,
started on first use and left running so the user can browse results (`mlflow ui` at the printed address).
Never a bare file store: thousands of runs make a file store slow, and only a server lets trials on other
Ray nodes log artifacts over HTTP. On a cluster, set MLFLOW_TRACKING_URI to the head node's server.

Runs are addressed by id through `MlflowClient` (no global "active run"), so many trials in one process, or
the driver and its trials, never step on each other's runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from fewsound.errors import ConfigError, TrackingError
from fewsound.storage import default_home

DEFAULT_PORT = 5000
PARENT_TAG = "mlflow.parentRunId"

# MLflow prints two "View run ..." lines (and makes one more HTTP request) every time a run ends: with thousands
# of child runs that drowns the sweep's progress line. Users can still opt back in by setting it to false.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# MLflow's usage telemetry sets and unsets an environment variable from its own thread; a trial logging runs from
# several threads meanwhile (proxy lookups read os.environ) then fails with KeyError '_MLFLOW_TELEMETRY_SESSION_ID'.
# Off by default (it also phones home, which an offline laptop or cluster cannot); set it to false to opt in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


# --------------------------------------------------------------------------------------------- the server


def server_health(uri: str, timeout: float = 1.0) -> str | None:
    """None when the tracking server at `uri` answers GET /health (MLflow's unauthenticated health route) within
    `timeout` seconds, else why not (one line)."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            return None if r.status == 200 else f"GET /health answered {r.status}"
    except Exception as e:
        reason = getattr(e, "reason", None) or e
        return " ".join(f"{type(reason).__name__}: {reason}".split())[:200]


def _healthy(uri: str, timeout: float = 1.0) -> bool:
    return server_health(uri, timeout) is None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _serves(pid: int | None, uri: str) -> bool:
    """Whether process `pid` (an `mlflow server`) or one of its children (gunicorn) listens on `uri`'s port. Two
    homes may start a server on the default port at once: the one that lost the port must not take the other's
    answers for its own."""
    import psutil

    port = int(uri.rsplit(":", 1)[1])
    try:
        root = psutil.Process(pid) if pid else None
        family = [root, *root.children(recursive=True)] if root else []
    except psutil.Error:
        return False
    for proc in family:
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections("tcp")):
                return True
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_server(home: Path | None = None, port: int | None = None, timeout: float = 90.0) -> str:
    """Start (or reuse) the local MLflow server of `home`; return its URI (http://127.0.0.1:PORT).

    The server's address is remembered in `home/server.json`, so later jobs reuse it while it is alive.
    It runs in its own session, so it outlives the job that started it.
    """
    home = Path(home or default_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    state = home / "server.json"
    if state.exists():
        try:
            saved = json.loads(state.read_text())
            uri, pid = saved["uri"], saved.get("pid")
        except (ValueError, KeyError, TypeError, AttributeError):
            uri = pid = None
        if uri and _healthy(uri) and _serves(pid, uri):
            return uri
    fixed = port is not None
    if port is not None and not _port_free(port):
        raise ConfigError(f"port {port}", "is in use by something that is not this fewsound MLflow server")
    (home / "artifacts").mkdir(exist_ok=True)
    for _attempt in range(3):  # a free port can be taken by another process while the server starts: retry
        if port is None or not fixed:
            port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port()
        uri = f"http://127.0.0.1:{port}"
        proc = _spawn_server(home, port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _healthy(uri) and _serves(proc.pid, uri):  # not another home's server that took the port first
                state.write_text(json.dumps({"uri": uri, "pid": proc.pid, "home": str(home)}))
                return uri
            time.sleep(0.5)
        else:
            proc.terminate()
            raise ConfigError(home / "server.log", f"the MLflow server did not answer on {uri} within {timeout:.0f} s")
        lost_port = "address already in use" in (home / "server.log").read_text(errors="replace")[-2000:].lower()
        if fixed or not lost_port:
            break
    raise ConfigError(home / "server.log", f"the MLflow server exited with code {proc.returncode}; see the log")


def server_command(backend_uri: str, artifacts: str, host: str, port: int, workers: int,
                   app_name: str | None = None) -> list[str]:  # fmt: skip
    """`mlflow server` with the flags fewsound's servers use (proxied artifacts, gunicorn settings)."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    conf = Path(__file__).with_name("mlflow_gunicorn.py")
    if os.name == "posix" and conf.exists():  # SQLite in WAL mode, threaded workers (see that file)
        cmd += ["--gunicorn-opts", f"--config {shlex.quote(str(conf))}"]
    if app_name:
        cmd += ["--app-name", app_name]
    return cmd


def _spawn_server(home: Path, port: int) -> subprocess.Popen:
    # one worker: the embedded server shares the laptop (or CI's 2 cores) with the fits
    cmd = server_command(f"sqlite:///{home / 'mlflow.db'}", str(home / "artifacts"), "127.0.0.1", port, workers=1)
    # MLflow 3's server also starts a job runner with a dozen huey worker processes (for GenAI jobs we never
    # submit): switched off to keep the embedded server light on a laptop or CI's 2 cores.
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(home / "server.log", "ab") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=home,
            env=env,
        )


def local_server_home(uri: str, home: Path | None = None) -> Path | None:
    """`home` (default: $FEWSOUND_HOME) when `uri` is the embedded server recorded in its server.json (alive or
    not), else None: a server someone else runs, which fewsound must not restart."""
    home = Path(home or default_home()).resolve()
    try:
        recorded = json.loads((home / "server.json").read_text())["uri"]
    except (OSError, ValueError, KeyError):
        return None
    return home if recorded.rstrip("/") == uri.rstrip("/") else None


def restart_local_server(uri: str, home: Path, wait_port: float = 30.0) -> str:
    """Start the embedded server of `home` again after it died, on the same store and the SAME port (trials
    already hold `uri`). Waits up to `wait_port` seconds for the dead server's port to be released."""
    port = int(uri.rstrip("/").rsplit(":", 1)[1])
    deadline = time.monotonic() + wait_port
    while not _port_free(port) and not _healthy(uri) and time.monotonic() < deadline:
        time.sleep(0.5)  # its workers exit once they notice that their master is gone
    return start_local_server(home, port=port)


def stop_local_server(home: Path | None = None, timeout: float = 15.0) -> bool:
    """Stop the server recorded in `home/server.json` (`python -m fewsound mlflow stop`, tests): SIGTERM to its
    process group (the gunicorn master and its workers), SIGKILL if it has not exited within `timeout`. True if
    one was running and stopped. Its store and artifacts stay; the next job starts it again."""
    import signal

    state = Path(home or default_home()) / "server.json"
    if not state.exists():
        return False
    try:
        info = json.loads(state.read_text())
        pgid = os.getpgid(int(info["pid"]))
    except (ValueError, KeyError, ProcessLookupError):
        state.unlink(missing_ok=True)
        return False
    state.unlink(missing_ok=True)
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _exited(int(info["pid"])):
            return True
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    return True


def _exited(pid: int) -> bool:
    """Whether the server process `pid` has exited (reaped here when this process started it: else it stays a
    zombie, which signals still reach)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0]:
            return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def local_server_status(home: Path | None = None) -> dict[str, Any]:
    """What `python -m fewsound mlflow status` prints about the embedded server of `home` ($FEWSOUND_HOME or
    ~/.fewsound): its address, process id, whether it answers, and where its store, artifacts and log are."""
    home = Path(home or default_home()).expanduser().resolve()
    out: dict[str, Any] = {
        "home": str(home),
        "store": str(home / "mlflow.db"),
        "store_mb": round((home / "mlflow.db").stat().st_size / 2**20, 1) if (home / "mlflow.db").exists() else 0.0,
        "artifacts": str(home / "artifacts"),
        "log": str(home / "server.log"),
        "uri": None,
        "pid": None,
        "running": False,
        "healthy": False,
    }
    state = home / "server.json"
    if state.exists():
        try:
            info = json.loads(state.read_text())
            out["uri"], out["pid"] = info.get("uri"), info.get("pid")
        except ValueError:
            pass
    if out["pid"]:
        try:
            os.kill(int(out["pid"]), 0)
            out["running"] = True
        except (ProcessLookupError, PermissionError, ValueError):
            pass
    out["healthy"] = bool(out["uri"]) and _healthy(out["uri"])
    return out


def tracking_uri(start: bool = True) -> str:
    """MLFLOW_TRACKING_URI when set (a cluster's server), else the embedded local server (started if needed).

    A file store is refused: it does not scale to thousands of runs and trials on other nodes cannot reach it.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if not uri.startswith(("http://", "https://", "databricks")):
            raise ConfigError(
                "MLFLOW_TRACKING_URI",
                f"{uri!r} is not a tracking server (http[s]://...); "
                "a file or database store cannot be reached by trials on other nodes",
            )
        return uri
    if not start:
        raise ConfigError("MLFLOW_TRACKING_URI", "is not set and starting a local server was not allowed")
    uri = start_local_server()
    os.environ["MLFLOW_TRACKING_URI"] = uri  # Ray workers started after this inherit it
    return uri


# --------------------------------------------------------------------------------------------- loggers


class Logger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class NullLogger:
    """Logs nothing; the default wherever a logger is optional (library code never requires MLflow)."""

    run_id = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


class MlflowRun:
    """One MLflow run addressed by id (create a new one, or attach to an existing `run_id`)."""

    def __init__(
        self,
        experiment: str,
        *,
        uri: str | None = None,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, Any] | None = None,
        run_id: str | None = None,
    ):
        from mlflow.tracking import MlflowClient

        self.uri = uri or tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = get_or_create_experiment(self.client, experiment)
        if run_id is None:
            all_tags = {k: str(v) for k, v in (tags or {}).items()}
            commit = git_commit()
            if commit:
                all_tags.setdefault("mlflow.source.git.commit", commit)
            if parent_run_id:
                all_tags[PARENT_TAG] = parent_run_id
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
            run_id = run.info.run_id
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # the client splits a batch to MLflow's limits (100 params per request)
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def log_run(
    client: Any,
    experiment_id: str,
    *,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
    curves: dict[str, list[tuple[int, float]]] | None = None,
    status: str = "FINISHED",
) -> str:
    """One whole run through MLflow's client: created with its tags (`mlflow.parentRunId` makes it a child run),
    its params, final metrics (step 0) and metric curves ({name: [(step, value)]}) in one log_batch (which the
    client splits to MLflow's batch limits), then ended with `status` unless that is RUNNING (a run that still
    gets artifacts is ended by the caller). Values must be finite. Returns the run id."""
    from mlflow.entities import Metric, Param

    assert status in ("RUNNING", "FINISHED", "FAILED", "KILLED"), status
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
    for k, points in (curves or {}).items():
        ms += [Metric(k, float(v), now, int(step)) for step, v in points]
    ps = [Param(k, str(v)) for k, v in (params or {}).items()]
    if ms or ps:
        client.log_batch(run_id, metrics=ms, params=ps)
    if status != "RUNNING":
        client.set_terminated(run_id, status=status)
    return run_id


# MLflow 3's UI opens an experiment on the layout its kind asks for: without this tag it guesses, and a new
# experiment opens on the GenAI layout (traces, agents); this kind opens on runs, charts and artifacts.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


# What MLflow's REST client calls a 401 and a 403 (MlflowException.error_code).
REFUSED_CODES = {"UNAUTHENTICATED": "wants a login", "PERMISSION_DENIED": "refused this login"}


def get_or_create_experiment(client: Any, name: str) -> str:
    """The id of experiment `name`, created if missing, marked as a model-training experiment (see above).
    A server that wants a login (or refuses the one given) is a one-line TrackingError: every driver opens its
    experiment here first, before any work starts."""
    from mlflow.exceptions import MlflowException

    try:
        exp = client.get_experiment_by_name(name)
    except MlflowException as e:
        if e.error_code not in REFUSED_CODES:
            raise
        raise TrackingError(
            client.tracking_uri,
            f"the tracking server {REFUSED_CODES[e.error_code]}: set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, or put them in ~/.mlflow/credentials (README: From laptop to cluster)",
        ) from None
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created concurrently by another trial
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an older version, or by hand: the user may have chosen
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def ui_url(uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment (or of one run) in its model-training layout: MLflow 3.17's UI picks
    its layout from a workflow-type switch (GenAI by default, traces and agents), which the URL can set."""
    page = "#/experiments"
    if experiment_id:
        page += f"/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{uri.rstrip('/')}/{page}?workflowType=machine_learning"


def git_commit() -> str | None:
    """The commit of the fewsound checkout, for `mlflow.source.git.commit` (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
