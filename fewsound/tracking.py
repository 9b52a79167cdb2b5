"""MLflow, behind one small adapter (and a no-op logger with the same methods).

The embedded default is a real MLflow tracking server on 127.0.0.1 over a SQLite file with proxied artifacts,
started on first use and left running so the user can browse results (`mlflow ui` at the printed address).
Never a bare file store: thousands of runs make a file store slow, and only a server lets trials on other
Ray nodes log artifacts over HTTP. On a cluster, set MLFLOW_TRACKING_URI to the head node's server.

Runs are addressed by id through `MlflowClient` (no global "active run"), so many trials in one process, or
the driver and its trials, never step on each other's runs.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Protocol

from fewsound.errors import ConfigError

DEFAULT_PORT = 5000
PARENT_TAG = "mlflow.parentRunId"

# MLflow prints two "View run ..." lines (and makes one more HTTP request) every time a run ends: with thousands
# of child runs that drowns the sweep's progress line. Users can still opt back in by setting it to false.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


# --------------------------------------------------------------------------------------------- the server


def default_home() -> Path:
    """Where the embedded server keeps its SQLite file, artifacts and log: $FEWSOUND_HOME or ~/.fewsound."""
    return Path(os.environ.get("FEWSOUND_HOME", Path.home() / ".fewsound")).expanduser()


def storage_root(sub: str) -> str:
    """Where Ray Tune / Ray Train keep trial state and checkpoints: $FEWSOUND_STORAGE/sub (a shared folder or a
    cloud URI such as s3://bucket/fewsound/ray: multi-node runs need one that every node reaches), else
    $FEWSOUND_HOME/sub on this machine."""
    root = os.environ.get("FEWSOUND_STORAGE")
    if root:
        return f"{root.rstrip('/')}/{sub}"
    return str(default_home() / sub)


def _healthy(uri: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except Exception:
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
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
            uri = json.loads(state.read_text())["uri"]
        except (ValueError, KeyError):
            uri = None
        if uri and _healthy(uri):
            return uri
    fixed = port is not None
    if fixed and not _port_free(port):
        raise ConfigError(f"port {port}", "is in use by something that is not this fewsound MLflow server")
    (home / "artifacts").mkdir(exist_ok=True)
    for _attempt in range(3):  # a free port can be taken by another process while the server starts: retry
        if not fixed:
            port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port()
        uri = f"http://127.0.0.1:{port}"
        proc = _spawn_server(home, port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _healthy(uri):
                state.write_text(json.dumps({"uri": uri, "pid": proc.pid, "home": str(home)}))
                return uri
            time.sleep(0.5)
        else:
            proc.terminate()
            raise ConfigError(home / "server.log", f"the MLflow server did not answer on {uri} within {timeout:.0f} s")
        lost_port = "address already in use" in (home / "server.log").read_text(errors="replace")[-2000:]
        if fixed or not lost_port:
            break
    raise ConfigError(home / "server.log", f"the MLflow server exited with code {proc.returncode}; see the log")


def _spawn_server(home: Path, port: int) -> subprocess.Popen:
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination",
        str(home / "artifacts"),
        "--serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",  # light: the server shares the laptop (or CI's 2 cores) with the fits
    ]
    if os.name == "posix":  # Gunicorn (not on Windows): a plain WSGI worker and SQLite in WAL mode, see the file
        conf = Path(__file__).with_name("mlflow_gunicorn.py")
        cmd += ["--gunicorn-opts", f"--config {shlex.quote(str(conf))}"]
        if _app_plugin_installed():  # + the endpoint that writes a pack's runs at once (fewsound/mlflow_app.py)
            cmd += ["--app-name", "fewsound"]
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


def _app_plugin_installed() -> bool:
    """Whether this install registered fewsound's `mlflow.app` entry point (a checkout updated without
    re-running `pip install -e .` has not; the server then runs without it and RunWriter falls back)."""
    from importlib.metadata import entry_points

    return any(e.name == "fewsound" for e in entry_points(group="mlflow.app"))


def stop_local_server(home: Path | None = None) -> bool:
    """Stop the server recorded in `home/server.json` (tests and `--stop-mlflow`). True if one was stopped."""
    import signal

    state = Path(home or default_home()) / "server.json"
    if not state.exists():
        return False
    info = json.loads(state.read_text())
    state.unlink()
    try:
        os.killpg(os.getpgid(info["pid"]), signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


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

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class RunWriter:
    """Writes whole runs for sweeps that log a child run per fit by the thousand: `write_runs` sends a pack's
    runs in one request to fewsound's server (fewsound/mlflow_app.py; one transaction) and falls back to three
    REST calls per run (create with its tags, log-batch, update) on any other MLflow server.

    The same calls through MlflowClient cost ~10-12 ms of client CPU per run (entity and protobuf conversions, and
    MLflow's request-header plugins probing for Databricks on every request); here they are JSON posted on a kept
    connection (benchmarks/mlflow_run_cost.py). Credentials and TLS settings are MLflow's own (MLFLOW_TRACKING_TOKEN,
    MLFLOW_TRACKING_USERNAME/PASSWORD, MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH, ...); other
    kinds of auth (Databricks, AWS SigV4, auth plugins) go through MLflow's http_request. Transient failures (429,
    5xx, dropped connections) are retried with backoff; errors are MLflow's (RestException with the server's message).
    """

    def __init__(self, uri: str):
        if uri.startswith("databricks"):
            from mlflow.utils.databricks_utils import get_databricks_host_creds

            self._creds = get_databricks_host_creds(uri)
        else:
            from mlflow.utils.credentials import get_default_host_creds

            self._creds = get_default_host_creds(uri)
        c = self._creds
        self._plain = not (uri.startswith("databricks") or c.aws_sigv4 or c.auth or c.use_databricks_sdk or c.client_id)
        self._timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 120))
        self._local = threading.local()  # one session (kept connection) per logging thread
        self._bulk = True  # until a server answers that it lacks fewsound's endpoints

    def _session(self) -> Any:
        s = getattr(self._local, "session", None)
        if s is None:
            import requests
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            retry = Retry(
                total=5,
                backoff_factor=0.5,
                status_forcelist=(429, 500, 502, 503, 504),
                allowed_methods=None,
                raise_on_status=False,
            )  # the last answer reaches verify_rest_response: MLflow's message
            s = requests.Session()
            for scheme in ("http://", "https://"):
                s.mount(scheme, HTTPAdapter(max_retries=retry))
            c = self._creds
            if c.username and c.password:
                s.auth = (c.username, c.password)
            elif c.token:
                s.headers["Authorization"] = f"Bearer {c.token}"
            s.verify = c.server_cert_path or not c.ignore_tls_verification
            if c.client_cert_path:
                s.cert = c.client_cert_path
            self._local.session = s
        return s

    def _post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._post_path(f"/api/2.0/mlflow/{endpoint}", body, bulk=False)

    def _post_path(self, path: str, body: dict[str, Any], bulk: bool = True) -> dict[str, Any] | None:
        """POST `body` to `path`; the answer's JSON. For fewsound's bulk endpoints (`bulk`): None when the server
        does not have them (another MLflow server: the caller falls back to MLflow's own API, from then on)."""
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        if self._plain:
            r = self._session().post(self._creds.host.rstrip("/") + path, json=body, timeout=self._timeout)
        else:
            r = http_request(self._creds, path, "POST", json=body)
        if bulk and r.status_code in (404, 405) and "error_code" not in r.text:  # no such route (not MLflow's 404)
            self._bulk = False
            return None
        return verify_rest_response(r, path).json()

    def write_runs(self, experiment_id: str, runs: list[dict[str, Any]]) -> list[str]:
        """Create several whole runs at once; returns their ids. Each run is a dict: run_name, tags, params,
        metrics (final, step 0), curves ({name: [(step, value)]}), status (RUNNING, FINISHED, FAILED). Values must
        be finite. One request on fewsound's server (fewsound/mlflow_app.py); elsewhere three per run."""
        now = int(time.time() * 1000)
        runs = [
            dict(r, run_id=r.get("run_id") or uuid.uuid4().hex, start_time=r.get("start_time") or now) for r in runs
        ]
        if self._bulk:
            from fewsound.mlflow_app import WRITE

            body = {
                "experiment_id": experiment_id,
                "runs": [
                    dict(
                        r,
                        curves={k: [[int(s), float(v)] for s, v in pts] for k, pts in (r.get("curves") or {}).items()},
                    )
                    for r in runs
                ],
            }
            out = self._post_path(WRITE, body)
            if out is not None:
                return out["run_ids"]
        ids = []
        for r in runs:
            run_id = self.create(experiment_id, r["run_name"], r.get("tags") or {})
            self.log(run_id, params=r.get("params"), metrics=r.get("metrics"), curves=r.get("curves"))
            if r.get("status", "FINISHED") != "RUNNING":
                self.end(run_id, r.get("status", "FINISHED"))
            ids.append(run_id)
        return ids

    def end_runs(self, statuses: dict[str, str]) -> None:
        """Set {run_id: status} (FINISHED, FAILED, KILLED) and the end time of several runs at once."""
        if not statuses:
            return
        if self._bulk:
            from fewsound.mlflow_app import END

            body = {
                "runs": [{"run_id": k, "status": v} for k, v in statuses.items()],
                "end_time": int(time.time() * 1000),
            }
            if self._post_path(END, body) is not None:
                return
        for run_id, status in statuses.items():
            self.end(run_id, status)

    def create(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
        """A RUNNING run with its tags (where `mlflow.parentRunId` makes it a child run); returns its id."""
        body = {
            "experiment_id": experiment_id,
            "run_name": run_name,
            "start_time": int(time.time() * 1000),
            "tags": [{"key": k, "value": str(v)} for k, v in tags.items()],
        }
        return self._post("runs/create", body)["run"]["info"]["run_id"]

    def log(
        self,
        run_id: str,
        *,
        params: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
        curves: dict[str, list[tuple[int, float]]] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Params, final metrics (step 0), metric curves ({name: [(step, value)]}) and tags, in as few calls as
        MLflow's batch limits allow (1,000 metrics, 100 params, 100 tags per call). Values must be finite."""
        now = int(time.time() * 1000)
        ms = [{"key": k, "value": float(v), "timestamp": now, "step": 0} for k, v in (metrics or {}).items()]
        for k, points in (curves or {}).items():
            ms += [{"key": k, "value": float(v), "timestamp": now, "step": int(step)} for step, v in points]
        ps = [{"key": k, "value": str(v)} for k, v in (params or {}).items()]
        ts = [{"key": k, "value": str(v)} for k, v in (tags or {}).items()]
        while ms or ps or ts:
            self._post("runs/log-batch", {"run_id": run_id, "metrics": ms[:800], "params": ps[:100], "tags": ts[:100]})
            ms, ps, ts = ms[800:], ps[100:], ts[100:]

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        assert status in ("FINISHED", "FAILED", "KILLED"), status
        self._post("runs/update", {"run_id": run_id, "status": status, "end_time": int(time.time() * 1000)})


def get_or_create_experiment(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created concurrently by another trial
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str | None:
    """The commit of the fewsound checkout, for `mlflow.source.git.commit` (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
