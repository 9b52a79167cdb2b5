"""The embedded MLflow server's one addition: a pack's child runs written in one request.

`mlflow server --app-name fewsound` (the entry point `fewsound = fewsound.mlflow_app:create_app` in the
`mlflow.app` group, pyproject.toml) serves MLflow's own Flask app, unchanged, plus two endpoints:

    POST /api/2.0/fewsound/runs/write  {"experiment_id": "1", "runs": [RUN, ...]}  ->  {"run_ids": [...]}
        RUN = {"run_id": 32 hex (optional; makes a retried request idempotent), "run_name": str,
               "status": "RUNNING" | "FINISHED" | "FAILED" | "KILLED", "start_time": ms, "end_time": ms | null,
               "tags": {k: v}, "params": {k: v}, "metrics": {k: number}, "curves": {k: [[step, number], ...]}}
    POST /api/2.0/fewsound/runs/end    {"runs": [{"run_id": ..., "status": ...}], "end_time": ms}

Why: a sweep logs one child run per fit, and through MLflow's REST API each costs three requests (create,
log-batch, update) that the SQLAlchemy store answers in ~20 ms of server CPU - as much as a 0.2 s fit's
orchestration budget on its own. Here the runs of a pack are one transaction. The rows are MLflow's own
(its ORM models, its validation, its artifact locations), so the runs are ordinary runs to the UI, MlflowClient,
search and `jobs/report.py`. On a store that is not SQLAlchemy the same endpoints go through the store's API.
Clients fall back to MLflow's REST API when a server lacks these endpoints (fewsound.tracking.RunWriter).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

WRITE = "/api/2.0/fewsound/runs/write"
END = "/api/2.0/fewsound/runs/end"
STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")


def create_app() -> Any:
    """MLflow's tracking server app with the two endpoints added (an `mlflow.app` plugin factory)."""
    from mlflow.server import app

    if "fewsound" not in app.blueprints:
        app.register_blueprint(_blueprint())
    return app


def _blueprint() -> Any:
    from flask import Blueprint, jsonify, request
    from mlflow.server.handlers import _get_tracking_store, catch_mlflow_exception

    bp = Blueprint("fewsound", __name__)

    @bp.route(WRITE, methods=["POST"])
    @catch_mlflow_exception
    def write() -> Any:
        body = request.get_json(force=True, silent=True)
        _require(
            isinstance(body, dict) and "experiment_id" in body and isinstance(body.get("runs"), list),
            "expected {'experiment_id': ..., 'runs': [...]}",
        )
        return jsonify({"run_ids": write_runs(_get_tracking_store(), str(body["experiment_id"]), body["runs"])})

    @bp.route(END, methods=["POST"])
    @catch_mlflow_exception
    def end() -> Any:
        body = request.get_json(force=True, silent=True)
        _require(isinstance(body, dict) and isinstance(body.get("runs"), list), "expected {'runs': [...]}")
        end_runs(_get_tracking_store(), body["runs"], int(body.get("end_time") or time.time() * 1000))
        return jsonify({})

    return bp


def _require(ok: bool, what: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    if not ok:
        raise MlflowException(f"fewsound runs endpoint: {what}", INVALID_PARAMETER_VALUE)


def _entities(spec: dict[str, Any]) -> tuple[list, list, list]:
    """MLflow entities of one run spec, validated as MLflow's log-batch validates them (duplicates dropped)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.validation import _validate_batch_log_data

    now = int(time.time() * 1000)
    ts = int(spec.get("start_time") or now)
    tags = [RunTag(str(k), str(v)) for k, v in (spec.get("tags") or {}).items()]
    params = [Param(str(k), str(v)) for k, v in (spec.get("params") or {}).items()]
    metrics = {(str(k), 0, float(v)) for k, v in (spec.get("metrics") or {}).items()}
    for k, points in (spec.get("curves") or {}).items():
        metrics |= {(str(k), int(step), float(v)) for step, v in points}
    ms = [Metric(k, v, ts, step) for k, step, v in sorted(metrics)]
    _validate_batch_log_data(ms, params, tags)
    return ms, params, tags


def write_runs(store: Any, experiment_id: str, runs: list[dict[str, Any]]) -> list[str]:
    """Create every run of `runs` (see the module doc) in `experiment_id`; returns their ids in order."""
    from mlflow.entities import LifecycleStage, RunStatus, SourceType
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
    from mlflow.utils.uri import append_to_uri_path

    exp = store.get_experiment(experiment_id)
    _require(exp.lifecycle_stage == LifecycleStage.ACTIVE, f"experiment {experiment_id} is deleted")
    prepared = []
    for i, spec in enumerate(runs):
        _require(isinstance(spec, dict), f"runs[{i}] is not an object")
        status = str(spec.get("status", "FINISHED"))
        _require(status in STATUSES, f"runs[{i}].status {status!r} is not one of {STATUSES}")
        run_id = str(spec.get("run_id") or uuid.uuid4().hex)
        _require(len(run_id) == 32 and all(c in "0123456789abcdef" for c in run_id), f"runs[{i}].run_id {run_id!r}")
        name = str(spec.get("run_name") or run_id[:8])
        try:
            ms, ps, ts = _entities(spec)
        except (TypeError, ValueError) as e:
            _require(False, f"runs[{i}]: {e}")
        ts = [t for t in ts if t.key != MLFLOW_RUN_NAME]
        prepared.append((run_id, name, status, spec, ms, ps, ts))

    if not isinstance(store, SqlAlchemyStore):  # another store: its own API, run by run
        ids = []
        for _run_id, name, status, spec, ms, ps, ts in prepared:
            run = store.create_run(experiment_id, "unknown", int(spec.get("start_time") or 0), ts, name)
            store.log_batch(run.info.run_id, ms, ps, [])
            if status != "RUNNING":
                store.update_run_info(run.info.run_id, RunStatus.from_string(status), spec.get("end_time"), None)
            ids.append(run.info.run_id)
        return ids

    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag

    now = int(time.time() * 1000)
    with store.ManagedSessionMaker(read_only=False) as session:
        wanted = [p[0] for p in prepared]
        # a retried request (the answer was lost) must not write its runs twice
        existing = {r for (r,) in session.query(SqlRun.run_uuid).filter(SqlRun.run_uuid.in_(wanted))}
        for run_id, name, status, spec, ms, ps, ts in prepared:
            if run_id in existing:
                continue
            start = int(spec.get("start_time") or now)
            end = spec.get("end_time") or (None if status in ("RUNNING", "SCHEDULED") else now)
            run = SqlRun(
                name=name,
                artifact_uri=append_to_uri_path(exp.artifact_location, run_id, SqlAlchemyStore.ARTIFACTS_FOLDER_NAME),
                run_uuid=run_id,
                experiment_id=experiment_id,
                source_type=SourceType.to_string(SourceType.UNKNOWN),
                source_name="",
                entry_point_name="",
                user_id="unknown",
                status=status,
                start_time=start,
                end_time=end,
                deleted_time=None,
                source_version="",
                lifecycle_stage=LifecycleStage.ACTIVE,
            )
            run.tags = [SqlTag(key=t.key, value=t.value) for t in ts] + [SqlTag(key=MLFLOW_RUN_NAME, value=name)]
            run.params = [SqlParam(key=p.key, value=p.value) for p in ps]
            session.add(run)
            latest: dict[str, Any] = {}
            for m in ms:
                is_nan, value = store.sanitize_metric_value(m.value)
                session.add(
                    SqlMetric(
                        run_uuid=run_id, key=m.key, value=value, timestamp=m.timestamp, step=m.step, is_nan=is_nan
                    )
                )
                order = (m.step, m.timestamp, value)  # MLflow's "latest": the largest (step, timestamp, value)
                if m.key not in latest or order > latest[m.key][0]:
                    latest[m.key] = (order, is_nan)
            for key, ((step, ts_, value), is_nan) in latest.items():
                session.add(
                    SqlLatestMetric(run_uuid=run_id, key=key, value=value, timestamp=ts_, step=step, is_nan=is_nan)
                )
    return wanted


def end_runs(store: Any, runs: list[dict[str, Any]], end_time: int) -> None:
    """Set the status (FINISHED, FAILED, KILLED) and end time of each run: one transaction on SQLAlchemy."""
    from mlflow.entities import RunStatus
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    wanted = {}
    for i, r in enumerate(runs):
        _require(isinstance(r, dict) and "run_id" in r, f"runs[{i}] has no run_id")
        status = str(r.get("status", "FINISHED"))
        _require(status in STATUSES, f"runs[{i}].status {status!r} is not one of {STATUSES}")
        wanted[str(r["run_id"])] = status
    if not isinstance(store, SqlAlchemyStore):
        for run_id, status in wanted.items():
            store.update_run_info(run_id, RunStatus.from_string(status), end_time, None)
        return
    from mlflow.store.tracking.dbmodels.models import SqlRun

    with store.ManagedSessionMaker(read_only=False) as session:
        rows = session.query(SqlRun).filter(SqlRun.run_uuid.in_(list(wanted))).all()
        missing = set(wanted) - {r.run_uuid for r in rows}
        _require(not missing, f"no such run(s): {sorted(missing)[:5]}")
        for row in rows:
            row.status, row.end_time = wanted[row.run_uuid], end_time
