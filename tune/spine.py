"""What every driver (sweep, search, hypernetwork grid, training) stands on: the MLflow tag vocabulary, one paged
run search, the keyed parent run opened or reopened, stale runs marked, the progress/ETA text and one way to stop
on a signal.

    keyed = open_keyed_run("fit_inrs", SWEEP_TAG, sid, run_name=sid, tags={JOB_TAG: "fit_inrs"})
    if keyed.status is None: ...                       # created now (else: reopened, keyed.status was its status)
    runs = search_runs(client, exp_id, children_filter(parent_id, status="FINISHED"))   # every page
    mark_stale(client, exp_id, children_filter(parent_id))                         # RUNNING -> KILLED
    with StopOnSignal() as stop:                       # SIGINT/SIGTERM set stop.signal; Tune stops every trial
        tuner = tune.Tuner(..., run_config=tune.RunConfig(stop=stop.stopper))

Runs are found by tags only (no ORM, no private API): MLflow's `search_runs` returns at most `max_results` runs a
page (and 1,000 when a caller forgets the argument), so `search_runs` here always follows every page.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, Callable, Iterable

from ray import tune

from fewsound.errors import ConfigError
from fewsound.tracking import PARENT_TAG, MlflowRun, get_or_create_experiment, tracking_uri

# --- the tag vocabulary: every tag a driver or a trial writes, named once -------------------------------------
# PARENT_TAG ("mlflow.parentRunId", fewsound.tracking) makes a run a child run in MLflow's UI.
ROLE_TAG = "fewsound.role"  # "parent" on a driver's parent run; "trial"/"start_point" on a search's trial runs;
# SUMMARY_ROLE on a sweep's summary runs (one per row of its table: mean and 95% interval over clips per metric,
# in the experiment "<experiment> summary", tune.sweep.summary)
SUMMARY_ROLE = "summary"
SUMMARY_TAG = "fewsound.summary"  # a summary run: the table row it summarizes ("<group> | <label>")
SWEEP_PARENT_TAG = "fewsound.sweep_parent"  # a summary run: the parent run of its sweep's fits
NOTE_TAG = "mlflow.note.content"  # a run's description in MLflow's UI (Markdown)
JOB_TAG = "fewsound.job"  # the job that opened a parent run (fit_inrs, kan_ablation, search_inr, hyper_tables)
COMMAND_TAG = "fewsound.command"  # the command line that opened a parent run
SWEEP_TAG = "fewsound.sweep"  # a sweep's id, on its parent and every fit's run
FIT_KEY_TAG = "fewsound.fit_key"  # a fit's run: {family}-{clip_id}-{cfg_hash8}
PACK_TAG = "fewsound.pack"  # a fit's run: the pack it was fitted in
REASON_TAG = "fewsound.failure_reason"  # a FAILED run: why
RECORD_TAG = "fewsound.record"  # a fit's run: the record it was logged from (its computed-at stamp)
TARGET_AUDIO_TAG = "fewsound.target_audio"  # a fit's run: its target audio, an artifact path of its parent run
FAMILY_TAG = "fewsound.family"
LABEL_TAG = "fewsound.label"
N_FITS_TAG = "fewsound.n_fits"  # a sweep's parent: fits it plans
SEARCH_TAG = "fewsound.search"  # a search's id, on its parent
TRIAL_TAG = "fewsound.optuna_trial"  # a search trial's run: the number of its Optuna trial
PER_CLIP_TAG = "fewsound.per_clip"  # a finished search trial's run: each clip's metrics (JSON)
STOPPED_TAG = "fewsound.stopped_early"  # a KILLED search trial's run: why ("ASHA at step N", or interrupted)
GRID_TAG = "fewsound.grid"  # the Tables 2-6 grid's id, on its parent and trainings
TRAIN_KEY_TAG = "fewsound.train_key"  # a training's run: what identifies it (config, corpus, experiment)
RESUMED_TAG = "fewsound.resumed"  # a training's run that resumed from a checkpoint
EVAL_KEY_TAG = "fewsound.eval_key"  # a trained model's run: the evaluation logged on it
ATTEMPTS_TAG = "fewsound.attempts"  # a fit's run: fits tried (a diverged fit is refitted with a new seed)
NODE_TAG = "fewsound.node"  # a fit's run: the node that fitted it
NOT_APPLICABLE_PREFIX = "fewsound.na."  # + metric: why a metric does not apply to a fit
START_POINT_TAG = "fewsound.start_point"  # a search's start-point trial: which one ("paper kan", ...)
TRIALS_TAG = "fewsound.trials"  # a search's parent: trials asked for
BEST_RUN_TAG = "fewsound.best_run_id"  # a search's parent: the best trial's run
BEST_TRIAL_TAG = "fewsound.best_trial"  # a search's parent: the best trial's number
N_TRAININGS_TAG = "fewsound.n_trainings"  # the grid's parent: trainings it plans
PAPER_ROWS_TAG = "fewsound.paper_rows"  # a grid training's run: the paper's table rows it fills
KIND_TAG = "fewsound.kind"  # a training's run: fewsound or hypersound
TARGET_TAG = "fewsound.target"  # a training's run: what the hypernetwork predicts
RESUME_EPOCH_PREFIX = "fewsound.resume.epoch_"  # + epoch: the checkpoint digest a resumed training loaded
LEASE_PREFIX = "fewsound.lease."  # + driver id: a driver's lease on a sweep or search (tune.lease)

PAGE = 5000  # runs per page of a search (MLflow's server caps a page at 50,000)


# --- finding runs -----------------------------------------------------------------------------------------------


def search_runs(client: Any, exp_id: str, filter_string: str = "", order_by: list[str] | None = None) -> list[Any]:
    """Every run of experiment `exp_id` matching `filter_string` (MLflow's filter syntax), following every page."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [exp_id], filter_string=filter_string, order_by=order_by, max_results=PAGE, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def tag_filter(tag: str, value: Any) -> str:
    return f"tags.`{tag}` = '{value}'"


def children_filter(parent_run_id: str, status: str | None = None, *, not_status: str | None = None) -> str:
    """The filter of a parent run's child runs, optionally only those with (or without) one status."""
    parts = [tag_filter(PARENT_TAG, parent_run_id)]
    if status:
        parts.append(f"attributes.status = '{status}'")
    if not_status:
        parts.append(f"attributes.status != '{not_status}'")
    return " and ".join(parts)


def runs_by_tag(runs: Iterable[Any], tag: str) -> dict[str, list[Any]]:
    """{tag value: its runs} of the runs that carry `tag`."""
    out: dict[str, list[Any]] = {}
    for r in runs:
        if tag in r.data.tags:
            out.setdefault(r.data.tags[tag], []).append(r)
    return out


# --- the keyed run a driver opens ------------------------------------------------------------------------------


@dataclasses.dataclass
class Keyed:
    """A driver's run found by its key, or created: `status` is what it was when found (None: created now)."""

    run: MlflowRun
    status: str | None

    @property
    def created(self) -> bool:
        return self.status is None


def open_keyed_run(
    experiment: str,
    key_tag: str,
    key: str,
    *,
    run_name: str,
    tags: dict[str, Any] | None = None,
    role: str | None = "parent",
    reopen_finished: bool = True,
    uri: str | None = None,
) -> Keyed:
    """The run tagged `key_tag` = `key` (and ROLE_TAG = `role` unless None): the newest one is reopened (RUNNING),
    so re-running a driver continues its run; with `reopen_finished=False` a FINISHED one is returned as it is
    (a finished training is reported, not redone). Else a new run is created with `tags`, the key, the role and
    the command line."""
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    exp_id = get_or_create_experiment(client, experiment)
    where = tag_filter(key_tag, key) + (f" and {tag_filter(ROLE_TAG, role)}" if role else "")
    found = search_runs(client, exp_id, where, order_by=["attributes.start_time DESC"])
    done = [r for r in found if r.info.status == "FINISHED"]
    if done and not reopen_finished:
        return Keyed(MlflowRun(experiment, uri=uri, run_id=done[0].info.run_id), "FINISHED")
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return Keyed(MlflowRun(experiment, uri=uri, run_id=found[0].info.run_id), found[0].info.status)
    all_tags = {**(tags or {}), key_tag: key, COMMAND_TAG: " ".join(sys.argv)}
    if role:
        all_tags[ROLE_TAG] = role
    return Keyed(MlflowRun(experiment, uri=uri, run_name=run_name, tags=all_tags), None)


def mark_stale(
    client: Any,
    exp_id: str,
    filter_string: str,
    *,
    keep: Callable[[Any], bool] = lambda run: True,
    tags: dict[str, str] | None = None,
) -> int:
    """Runs matching `filter_string` still RUNNING (left by a killed driver or a dead worker) for which `keep` holds:
    tagged `tags`, ended KILLED. Returns how many."""
    running = f"attributes.status = 'RUNNING' and {filter_string}" if filter_string else "attributes.status = 'RUNNING'"
    n = 0
    for r in search_runs(client, exp_id, running):
        if keep(r):
            for k, v in (tags or {}).items():
                client.set_tag(r.info.run_id, k, v)
            client.set_terminated(r.info.run_id, status="KILLED")
            n += 1
    return n


# --- progress -------------------------------------------------------------------------------------------------


def fmt_duration(seconds: float) -> str:
    """'1h05m' / '4m09s'; '?' for NaN (nothing measured yet)."""
    if seconds != seconds:
        return "?"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def eta_seconds(done: int, total: int, elapsed: float) -> float:
    """Seconds left at the pace so far (`done` units in `elapsed` seconds); NaN before the first unit."""
    return (total - done) * elapsed / done if done > 0 else float("nan")


# --- stopping on a signal -------------------------------------------------------------------------------------

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by `StopOnSignal(interrupt=True)`: `signum` says which signal arrived."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopAll(tune.Stopper):
    """Tune stops every trial once a signal has arrived. It holds nothing but the signal's number: Tune pickles
    its run config (the previous signal handlers, which StopOnSignal keeps, may not pickle)."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return self.signal is not None

    def stop_all(self) -> bool:
        return self.signal is not None


class StopOnSignal:
    """Within the block, SIGINT (Ctrl+C) and SIGTERM (`kill`, a scheduler, `ray job stop`) stop the driver cleanly:
    `signal` holds the first one's number, and the previous handlers come back at exit.

    - Default (Tune drivers): the signal only sets the flag; `stopper` (a Tune Stopper) then ends every trial and
      `tuner.fit()` returns. A second signal raises KeyboardInterrupt (the user insists). Tune's own SIGINT
      handler is switched off (its documented TUNE_DISABLE_SIGINT_HANDLER) so that one handler decides.
    - `interrupt=True` (drivers blocked in a call with no stop API: Ray Train's `trainer.fit()`, `ray.wait`): the
      signal raises Interrupted in the main thread. Ray may turn it into a plain KeyboardInterrupt on its way
      out of a blocking call: `signal` keeps which signal it was.

    Without this, SIGTERM reaches Ray's own handler, which aborts the driver with a C++ stack trace (exit 134).
    Outside the main thread (a driver run from a thread, e.g. tests) signals cannot be caught: nothing is set."""

    def __init__(self, interrupt: bool = False) -> None:
        self.interrupt = interrupt
        self.stopper = _StopAll()
        self._previous: dict[int, Any] = {}
        self._env: str | None = None

    @property
    def signal(self) -> int | None:
        return self.stopper.signal

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.interrupt:
            self.stopper.signal = signum
            raise Interrupted(signum)
        if self.stopper.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.stopper.signal = signum
        print(
            f"{signal.Signals(signum).name} received: stopping the trials (finished fits are kept; "
            "send it again to stop at once)",
            flush=True,
        )

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            if not self.interrupt:
                self._env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        restored = bool(self._previous)
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python
        self._previous.clear()
        if restored and not self.interrupt:
            if self._env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._env


def env_number(name: str) -> float | None:
    """Environment setting `name` as a number >= 0, None where unset or empty. ConfigError, naming the variable,
    on anything else."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(name, f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(name, f"{text!r}: need a number >= 0")
    return value
