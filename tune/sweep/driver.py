"""The sweep driver: one MLflow parent run, Ray Tune trials of packed fits, idempotent resume.

    summary = run_sweep("fit_inrs", tasks, corpus=DIR)

1. Open (or, when re-run, reopen) the sweep's parent run; log the fit records kept in the sweep's storage that
   are not logged yet (tune.sweep.durable: computed before, never refitted); list the keys that already have a FINISHED
   child run and skip them; mark runs of unfinished keys left RUNNING by a killed driver as KILLED.
2. Start or join Ray and plan for the cluster's capacity (tune.ray_env: its ceiling where the cluster states one,
   so that pending trials make the autoscaler start nodes): trials ask for a GPU fraction when the cluster has or
   can grow GPUs, one CPU otherwise; the first line printed says what was asked for and why.
3. Pack the remaining fits (one config, many clips per pack), bundle the packs into a few Tune trials per trial
   slot (fewsound.plan.bundle: near-equal cost, Tune's per-trial cost paid per trial, not per pack) and run them
   with actor reuse.
   Trials record every fit in the sweep's storage before they log it, and keep the records when the tracking
   server does not answer; meanwhile the driver watches the server (and restarts its own embedded one).
4. Log the records the trials kept, record a FAILED child run for every fit whose trial crashed beyond its
   retries (the sweep goes on), print one line per failed fit with its reason (the tag on its child run), then
   log the per-clip results and the paper-style tables to the parent run, and one summary run per table row
   beneath it (tune.sweep.summary: the row's mean and 95% interval per metric, what MLflow's UI lists and sorts).
   A tracking server that stays down ends the sweep with one line (fewsound.errors.TrackingError): the records
   wait for the next run of the command.

Output: what the sweep asked for, one line per finished pack (done / failed / remaining / ETA / fits per hour),
one line per failed fit, where the summary runs are in MLflow's UI. Trials' own output reaches the driver (and
`ray job logs`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from ray import tune

from fewsound import records, storage
from fewsound.config import cfg_hash
from fewsound.data.corpus import corpus_location
from fewsound.errors import Stopped
from fewsound.plan import FitTask, bundle, pack, pack_to_config
from fewsound.tracking import MlflowRun, git_commit, tracking_uri
from tune.lease import SweepLease, take_lease
from tune.ray_env import (
    init_ray,
    quiet_defaults,
    storage_root,
    tune_errors_silenced,
)
from tune.spine import (
    FIT_KEY_TAG,
    JOB_TAG,
    N_FITS_TAG,
    SWEEP_TAG,
    StopOnSignal,
    mark_stale,
    open_keyed_run,
)
from tune.sweep.context import TrialContext
from tune.sweep.durable import TrackingWatch, client_defaults, replay_pending
from tune.sweep.plan import SweepPlan, check_arguments, plan_sweep
from tune.sweep.progress import Progress, ServerWatch
from tune.sweep.summary import (
    SweepSummary,
    finish_parent,
    finished_runs,
    print_failures,
    record_crashed_trials,
    summarize,
)
from tune.sweep.summary_runs import print_summary_runs
from tune.sweep.trial import tune_trainable


def sweep_id(name: str, tasks: list[FitTask]) -> str:
    return f"{name}-{cfg_hash(sorted(t.key for t in tasks))}"


def run_sweep(
    name: str,
    tasks: list[FitTask],
    *,
    corpus: str | Path,
    experiment: str | None = None,
    pack_size: int = 16,
    address: str | None = None,
    gpu_fraction: float = 0.25,
    max_retries: int = 1,
    trial_failures: int = 1,
    curve_every_n_packs: int = 10,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    storage: str | None = None,
    progress: bool = True,
    table: dict[str, Any] | None = None,
    metrics: tuple[str, ...] | None = None,
    log_artifacts: bool = True,
    tune_restarts: int = 2,
    trials_per_slot: int | None = 4,
    listen_clips: int | None = None,
    max_concurrent: int | None = None,
    parent_run_id: str | None = None,
) -> SweepSummary:
    """Run every fit of `tasks` not already finished in MLflow. See the module docstring.

    pack_size: fits fitted at once (one config). trials_per_slot: packs are bundled into about this many trials
    per trial slot (trials the cluster runs at once at its capacity); None: one trial per pack.
    max_concurrent: most trials at once (None: the cluster's capacity).
    max_retries: refits of a diverged fit (new seed) before it is
    FAILED. trial_failures: Tune's retries of a crashed trial (FailureConfig.max_failures). tune_restarts: new
    Tune runs over the unfinished fits when Tune itself stops with an exception (it does when, e.g., Ray's OOM
    killer takes an actor during its start); resume by key makes that safe.
    num_cpus/num_gpus: of a local Ray started here (ignored when joining a cluster or when Ray is initialised).
    table: keyword arguments of `fewsound.tables.build_table` for the parent run's table (title, row_header,
    paper_table, label_order).
    metrics: the metrics to compute (None: all that apply; see TrialContext.metrics). log_artifacts: audio and
    spectrogram per fit (benchmarks turn both down to isolate orchestration; the child runs are logged anyway).
    listen_clips: clips on the parent run's listening page, report/listen.html (tune.report; None: a few, 0: none).
    parent_run_id: an existing run of `experiment` to log the fits under instead of the sweep's own parent run
    (e.g. a search's parent, whose held-out refits are a sweep): it is reopened (RUNNING), gets the sweep's tables,
    plots and metrics, and is ended as the sweep ends its own parent.
    """
    check_arguments(name, tasks, gpu_fraction, pack_size, max_retries, trial_failures, trials_per_slot, max_concurrent)
    quiet_defaults()
    client_defaults()  # MLflow's client fails fast: a driver that waits on a dead server reports it in one line
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    s = _open(name, tasks, experiment or name, progress, parent_run_id)  # 1.
    timings["mlflow_setup"] = time.perf_counter() - t0

    t = time.perf_counter()  # 2.
    plan = plan_sweep(init_ray(address, num_cpus=num_cpus, num_gpus=num_gpus), gpu_fraction, max_concurrent)
    timings["ray_init"] = time.perf_counter() - t
    ctx = _trial_context(s, corpus, max_retries, curve_every_n_packs, log_artifacts, metrics)
    bundles_per_tune = None if trials_per_slot is None else plan.slots * trials_per_slot
    if progress:
        print(f"[{name}] {plan.describe()}", flush=True)

    t = time.perf_counter()
    callback = Progress(name, len(s.todo), t0, progress)
    with StopOnSignal() as stop:  # 3. and the first half of 4.
        n_trials = _tune_until_done(
            s, ctx, plan, pack_size, bundles_per_tune, callback, stop, tune_restarts, trial_failures, storage
        )
    timings["tune"] = time.perf_counter() - t
    if stop.signal is not None:
        _stopped(s, stop.signal, t0)

    t = time.perf_counter()
    with s.watch.guard():  # 4.
        summary = summarize(s, plan, callback.results, n_trials, timings, t0)
        if progress:
            print_failures(name, s.parent.client, s.parent.experiment_id, s.sid, {t.key for t in s.todo})
        timings["summarize"] = time.perf_counter() - t
        t_tables = time.perf_counter()
        finish_parent(s.parent, summary, table or {}, listen_clips if log_artifacts else 0)  # the page plays audio
        timings["tables_and_listen_page"] = time.perf_counter() - t_tables
    if progress and summary.summary_runs:
        print_summary_runs(name, summary)
    timings["report"] = time.perf_counter() - t
    summary.seconds = time.perf_counter() - t0
    s.lease.release()
    return summary


@dataclasses.dataclass
class _Opened:
    """A sweep after step 1: its tracking server watched, its lease held, its parent run open, what is left."""

    name: str
    tasks: list[FitTask]
    experiment: str
    sid: str
    uri: str
    watch: TrackingWatch
    lease: SweepLease
    parent: MlflowRun
    progress: bool
    todo: list[FitTask] = dataclasses.field(default_factory=list)
    replayed: int = 0
    finished: dict[str, Any] = dataclasses.field(default_factory=dict)  # {key: FINISHED run} when step 1 ended


def _open(name: str, tasks: list[FitTask], experiment: str, progress: bool, parent_run_id: str | None) -> _Opened:
    """Step 1: the tracking server answers (tune.sweep.durable), this driver holds the sweep's lease (a second driver is
    refused, tune.lease), the parent run is open, kept records are logged and `todo` lists the fits left."""
    uri, sid = tracking_uri(), sweep_id(name, tasks)
    watch = TrackingWatch(name, uri, records_root(experiment), sid)
    with watch.guard():
        watch.ensure()
        lease = take_lease(uri, experiment, sid)
        if parent_run_id is None:
            parent = _open_parent(experiment, uri, sid, name, len(tasks))
        else:  # an existing run (a search's parent): reopened
            parent = MlflowRun(experiment, uri=uri, run_id=parent_run_id)
            parent.client.update_run(parent_run_id, status="RUNNING")
        s = _Opened(name, tasks, experiment, sid, uri, watch, lease, parent, progress)
        s.finished, s.replayed = _log_kept_records(s, tasks)
        s.todo = [t for t in tasks if t.key not in s.finished]
        _mark_stale(parent.client, parent.experiment_id, {t.key for t in s.todo})
    return s


def _tune_until_done(
    s: _Opened,
    ctx: TrialContext,
    plan: SweepPlan,
    pack_size: int,
    bundles_per_tune: int | None,
    callback: Progress,
    stop: StopOnSignal,
    tune_restarts: int,
    trial_failures: int,
    storage: str | None,
) -> int:
    """Step 3 and the first half of 4: pack and bundle the fits left, run them in Tune, log what the trials recorded and
    the crashed trials' fits; a new Tune run over what is left when Tune itself stops with an exception (at most
    `tune_restarts`). Returns the number of trials run."""
    client, exp_id = s.parent.client, s.parent.experiment_id

    def packs_and_bundles(tasks_left: list[FitTask]) -> tuple[list[list[FitTask]], list[list[int]]]:
        packs = pack(tasks_left, pack_size)
        return packs, bundle(packs, len(packs) if bundles_per_tune is None else bundles_per_tune)

    packs, bundles = packs_and_bundles(s.todo)
    if s.progress:
        print(
            f"[{s.name}] {len(s.tasks)} fits: {len(s.tasks) - len(s.todo)} already finished, {len(s.todo)} to run "
            f"in {len(packs)} packs, {len(bundles)} trials; MLflow {s.uri} experiment {s.experiment!r}",
            flush=True,
        )
    n_trials = 0
    for attempt in range(tune_restarts + 1):
        if not packs:
            break
        n_trials += len(bundles)
        run_name = f"{s.sid}-r{attempt}" if attempt else s.sid
        try:
            grid = _tune(
                packs,
                bundles,
                ctx,
                plan,
                run_name,
                trial_failures,
                storage,
                [callback, ServerWatch(s.watch)],
                stop.stopper,
            )
        except Exception as e:  # Tune itself stopped (e.g. Ray's OOM killer took an actor while it started)
            if stop.signal is not None:
                break
            if attempt == tune_restarts:
                raise
            print(
                f"[{s.name}] Ray Tune stopped ({type(e).__name__}: {_first_line(e)}); restarting the fits that "
                "are not finished",
                flush=True,
            )
            with s.watch.guard():
                done_keys = _log_kept_records(s, s.todo, after_tune=True)[0]
                _mark_stale(client, exp_id, {t.key for t in s.todo})
            packs, bundles = packs_and_bundles([t for t in s.todo if t.key not in done_keys])
            continue
        with s.watch.guard():
            _log_kept_records(s, s.todo, after_tune=True)
            record_crashed_trials(grid, packs, ctx, client, exp_id)
            _mark_stale(client, exp_id, {t.key for t in s.todo})  # runs of workers that died
        break
    return n_trials


def records_root(experiment: str) -> str:
    """Where a sweep of `experiment` keeps its fit records: records/<experiment>/ of the storage root (the same fits
    logged to another experiment are computed there again, as MLflow's runs are looked up per experiment)."""
    return storage.join(storage_root("records"), records.component(experiment))


def _log_kept_records(s: _Opened, tasks: list[FitTask], after_tune: bool = False) -> tuple[dict[str, Any], int]:
    """Make sure the tracking server answers (restarting the embedded one), log every fit record of the sweep that
    is not logged yet (or whose run is missing), and return ({key: FINISHED run}, runs created from records)."""
    s.watch.ensure()
    client, exp_id = s.parent.client, s.parent.experiment_id
    finished = finished_runs(client, exp_id)
    missing = {t.key for t in tasks if t.key not in finished}
    n = replay_pending(client, exp_id, s.watch.root, s.watch.sweep, s.parent.run_id, missing)
    if n:
        finished = finished_runs(client, exp_id)
        if s.progress:
            when = "computed now, kept until MLflow answered" if after_tune else "computed earlier, not refitted"
            print(f"[{s.name}] logged {n} fit records from {s.watch.where} ({when})", flush=True)
    return finished, n


def _trial_context(
    s: _Opened,
    corpus: str | Path,
    max_retries: int,
    curve_every_n_packs: int,
    log_artifacts: bool,
    metrics: tuple[str, ...] | None,
) -> TrialContext:
    """What every trial of the sweep is handed besides its packs."""
    return TrialContext(
        corpus=corpus_location(corpus),  # a URI or a name every node resolves, never a relative path
        experiment=s.experiment,
        parent_run_id=s.parent.run_id,
        sweep=s.sid,
        tracking_uri=s.uri,
        max_retries=max_retries,
        curve_every_n_packs=curve_every_n_packs,
        log_artifacts=log_artifacts,
        experiment_id=s.parent.experiment_id,
        git_commit=git_commit(),
        metrics=tuple(metrics) if metrics is not None else None,
        records=s.watch.root,
    )


def _stopped(s: _Opened, signum: int, t0: float) -> None:
    """After a signal stopped the trials: what they computed is logged (unless the server is down), runs they left
    RUNNING end KILLED, so does the parent; raise Stopped with what finished (nothing stopped is recorded FAILED:
    a re-run fits it)."""
    s.lease.release()
    if s.watch.answers():  # log what the trials computed, without waiting on a server that is down
        _log_kept_records(s, s.todo, after_tune=True)
    tasks, todo, parent = s.tasks, s.todo, s.parent
    client = parent.client
    todo_keys = {t.key for t in todo}
    _mark_stale(client, parent.experiment_id, todo_keys)
    finished = finished_runs(client, parent.experiment_id)
    now = sum(k in finished for k in todo_keys)
    parent.end("KILLED")
    raise Stopped(
        signum,
        f"{now} of the {len(todo)} fits to run finished in {time.perf_counter() - t0:.0f} s"
        f"{f' ({len(tasks) - len(todo)} were finished before)' if len(tasks) > len(todo) else ''}; "
        f"{len(todo) - now} left: re-run the same command to fit them (finished fits are skipped)",
    )


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines() or [""]
    return lines[0][:200]


def _tune(
    packs: list[list[FitTask]],
    bundles: list[list[int]],
    ctx: TrialContext,
    plan: SweepPlan,
    run_name: str,
    trial_failures: int,
    storage: str | None,
    callbacks: list[Any],
    stopper: Any = None,
) -> Any:
    """One Tune run: a trial per bundle of packs (the packs travel in the param_space as plain data), actors
    reused, at most `plan.slots` at once (what the cluster runs at its capacity, or --max-concurrent)."""
    trainable = tune.with_resources(tune.with_parameters(tune_trainable, ctx=ctx), plan.resources)
    trials = [
        {"index": t, "packs": [dict(pack_to_config(packs[i]), index=i) for i in b]} for t, b in enumerate(bundles)
    ]
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(
            reuse_actors=True,
            trial_dirname_creator=lambda trial: f"trial{trial.config['trial']['index']}",
            max_concurrent_trials=plan.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=storage or storage_root("ray_results"),  # $FEWSOUND_STORAGE on a cluster
            failure_config=tune.FailureConfig(max_failures=trial_failures),
            stop=stopper,  # tune.spine.StopOnSignal: SIGINT/SIGTERM end every trial
            verbose=0,
            callbacks=callbacks,
        ),
    )
    with tune_errors_silenced():  # each failed fit is printed once by run_sweep, with its reason
        return tuner.fit()


def _open_parent(experiment: str, uri: str, sid: str, name: str, n: int) -> MlflowRun:
    tags = {JOB_TAG: name, N_FITS_TAG: n}
    return open_keyed_run(experiment, SWEEP_TAG, sid, run_name=sid, tags=tags, uri=uri).run


def _mark_stale(client: Any, exp_id: str, todo_keys: set[str]) -> None:
    """Runs of unfinished fits still RUNNING (left by a killed driver or a dead worker): KILLED."""
    mark_stale(client, exp_id, "", keep=lambda r: r.data.tags.get(FIT_KEY_TAG) in todo_keys)
