"""The hypernetwork half of the paper (Tables 2-6) as one grid: what jobs/hyper_tables.py runs.

    cells = paper_cells([2, 3, 4, 5, 6], ["VCTK", "LibriSpeech"])      # every row of every table asked for
    summary = run_grid(cells, {"VCTK": "/data/vctk-fs", "LibriSpeech": "/data/libri-fs"}, settings)

A cell is one row of one paper table (Table 6: one row of one dataset's group). Cells that need the same model
(Table 2's "FewSound 17.5M" is Table 3's NERF row and Table 5's SoundStream row, as in the paper) share one
training: a training is keyed by its config, corpus and experiment (tune.hyper.train.run_key; the seed is in the
config), so the grid trains each model once and a re-run finds every finished one in MLflow.

MLflow: one parent run per grid (keyed by its trainings and evaluation options, so a re-run reopens it), one
child run per training (tune.hyper.train.run_training, Ray Train as for jobs/train_fewsound.py), evaluated as soon
as it finishes (tune.hyper.evaluation: rows, tables and means on the child; a re-run skips a finished evaluation). The
parent gets each paper table (mean ± std, the paper's numbers beside; Markdown, LaTeX, CSV), the long-audio
table, and per table a spectrogram grid (the ground truth of one validation clip and every row's
reconstruction of it).

Scheduling: each training runs inside a Ray task that calls run_training, so several trainings overlap when the
cluster has room for their workers; `parallel` trainings are in flight at once (default: as many as the
cluster's resources hold now, keeping one CPU for Ray Data - one at a time on a laptop, where one training's
workers take every CPU but one).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

from fewsound.config import cfg_hash
from fewsound.errors import Stopped
from fewsound.hyper.catalogue import (
    Cell,
    cells_text,
)
from tune.hyper.grid_plan import Settings, Training, plan
from tune.hyper.grid_report import finish_parent
from tune.spine import GRID_TAG, JOB_TAG, N_TRAININGS_TAG, PAPER_ROWS_TAG, children_filter, mark_stale, open_keyed_run


def max_parallel(resources: dict[str, float], scaling: Any) -> int:
    """How many trainings of `scaling` (a Ray Train ScalingConfig) the cluster holds at once, one CPU kept for
    Ray Data's readers (at least 1)."""
    per = scaling.resources_per_worker or {}
    n = scaling.num_workers
    fits = []
    if per.get("CPU"):
        fits.append(int((resources.get("CPU", 0) - 1) // (per["CPU"] * n)))
    if scaling.use_gpu:
        fits.append(int(resources.get("GPU", 0) // (per.get("GPU", 1) * n)))
    return max(1, min(fits) if fits else 1)


def _train_and_evaluate(tr: Training, s: Settings, parent_id: str, grid_id: str, uri: str) -> dict[str, Any]:
    """One training (or its finished run) and its evaluation (or the one already on its run): a Ray task. `uri`:
    the driver's tracking server (a Ray started earlier, with another environment, must not send runs elsewhere)."""
    import ray

    from fewsound.tables import hyper_label
    from fewsound.tracking import PARENT_TAG, MlflowRun
    from tune.hyper.evaluation import eval_resources, evaluate_run, evaluation_key, load_evaluation, log_evaluation
    from tune.hyper.train import run_training
    from tune.ray_env import capacity, cpu_means_cpu, use_gpus

    cpu_means_cpu()  # a 0-GPU task: the training runs on Ray Train's workers, nothing here may take a GPU
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per download buries the log
    os.environ["MLFLOW_TRACKING_URI"] = uri
    t0 = time.perf_counter()
    summary = run_training(
        tr.cfg,
        corpus=tr.corpus,
        storage=s.storage,
        experiment=s.experiment,
        num_workers=s.num_workers,
        tags={PARENT_TAG: parent_id, GRID_TAG: grid_id, PAPER_ROWS_TAG: cells_text(tr.cells)},
    )
    assert summary.key == tr.key, (summary.key, tr.key)
    run = MlflowRun(s.experiment, uri=summary.tracking_uri, run_id=summary.run_id)
    if summary.already_finished:  # trained for another grid: shown under this grid's parent from now on
        run.set_tags({PARENT_TAG: parent_id, GRID_TAG: grid_id})
    key = evaluation_key(tr.key, tr.corpus, s.clips, s.metrics, s.long_seconds)
    ev = load_evaluation(run, key)
    evaluated = ev is None
    if ev is None:  # in a task of its own: this one holds no CPU (it only waits on the training's workers)
        label = hyper_label(tr.cfg.model, None)
        nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]]
        task = ray.remote(max_retries=0)(evaluate_run).options(
            **eval_resources(nodes, use_gpus(capacity(ray.cluster_resources())))
        )
        run_opts = dict(label=label, clips=s.clips, metrics=s.metrics, long_seconds=s.long_seconds)
        ev = ray.get(task.remote(summary.run_id, summary.tracking_uri, tr.corpus, **run_opts))
        log_evaluation(run, ev, key, title=f"{label} on {Path(tr.corpus).name}", sample_rate=tr.cfg.model.sample_rate)
    return {
        "key": tr.key,
        "run_id": summary.run_id,
        "trained": not summary.already_finished,
        "evaluated": evaluated,
        "seconds": time.perf_counter() - t0,
        "evaluation": ev,
    }


@dataclasses.dataclass
class GridSummary:
    parent_run_id: str
    tracking_uri: str
    trainings: int
    trained: int
    evaluated: int
    skipped: int  # finished before (training and evaluation)
    failed: list[str]
    not_run: list[str]
    markdown: str
    seconds: float


def _open_parent(experiment: str, uri: str, grid_id: str, n: int):
    """The grid's parent run: the one of an earlier run of the same grid (reopened), else a new one."""
    tags = {JOB_TAG: "hyper_tables", N_TRAININGS_TAG: n}
    return open_keyed_run(experiment, GRID_TAG, grid_id, run_name=f"hyper-tables-{grid_id}", tags=tags, uri=uri).run


def run_grid(cells: list[Cell], corpora: dict[str, str], s: Settings, *, log: Any = print) -> GridSummary:
    """Train and evaluate every cell's model (see the module docstring); returns what was done and the tables."""
    import ray

    from fewsound.tracking import tracking_uri
    from tune.ray_env import choose_scaling, init_ray
    from tune.spine import StopOnSignal

    t0 = time.perf_counter()
    uri = tracking_uri()  # before Ray starts: its workers inherit MLFLOW_TRACKING_URI
    trainings = plan(cells, corpora, s)
    todo = [t for t in trainings if t.skip is None]
    resources = init_ray(s.address)
    scaling, _, _ = choose_scaling(resources, s.num_workers)
    parallel = s.parallel or max_parallel(resources, scaling)
    grid_id = cfg_hash({"trainings": sorted(t.key for t in todo), "eval": [s.clips, s.metrics, s.long_seconds]})
    parent = _open_parent(s.experiment, uri, grid_id, len(todo))
    log(
        f"[hyper_tables] {len(cells)} table rows -> {len(todo)} trainings ({len(trainings) - len(todo)} not run), "
        f"{parallel} at a time; MLflow parent run {parent.run_id}"
    )
    task = ray.remote(num_cpus=0, max_retries=0)(_train_and_evaluate)
    flight = _InFlight(task, s, parent, grid_id, uri, parallel, list(todo), log, t0)
    guard = StopOnSignal(interrupt=True)  # SIGINT/SIGTERM: stop the trainings, keep what finished (_stopped)
    try:
        with guard:
            flight.drain()
    except KeyboardInterrupt:
        _stopped(guard.signal or signal.SIGINT, flight.pending, parent, flight.results, len(todo))
    results, failed = flight.results, flight.failed
    not_run = [f"{cells_text(t.cells)}: {t.skip}" for t in trainings if t.skip]
    markdown = finish_parent(parent, cells, trainings, results, s, not_run, failed)
    return GridSummary(
        parent.run_id,
        uri,
        len(todo),
        sum(r["trained"] for r in results.values()),
        sum(r["evaluated"] for r in results.values()),
        sum(not r["trained"] and not r["evaluated"] for r in results.values()),
        failed,
        not_run,
        markdown,
        time.perf_counter() - t0,
    )


@dataclasses.dataclass
class _InFlight:
    """The grid's trainings as they run: `parallel` in flight (Ray object ref -> training) until the queue is
    empty; a failed one is retried (`settings.retries`) or recorded in `failed`."""

    task: Any  # the Ray remote function of _train_and_evaluate
    settings: Settings
    parent: Any
    grid_id: str
    uri: str
    parallel: int
    queue: list[Training]
    log: Any
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    pending: dict[Any, Training] = dataclasses.field(default_factory=dict)
    results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    failed: list[str] = dataclasses.field(default_factory=list)
    tries: dict[str, int] = dataclasses.field(default_factory=dict)

    def drain(self) -> None:
        import ray

        total, s = len(self.queue), self.settings
        while self.queue or self.pending:
            while self.queue and len(self.pending) < self.parallel:
                tr = self.queue.pop(0)
                self.tries[tr.key] = self.tries.get(tr.key, 0) + 1
                self.pending[self.task.remote(tr, s, self.parent.run_id, self.grid_id, self.uri)] = tr
            done, _ = ray.wait(list(self.pending), num_returns=1)
            tr = self.pending.pop(done[0])
            try:
                self.results[tr.key] = ray.get(done[0])
            except Exception as e:  # noqa: BLE001 - one failed training must not lose the others; recorded
                lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
                # Ray's error text ends with advice; the line that says what happened names the error or the kill
                reason = next((x for x in lines if "killed" in x or "Error" in x), lines[-1])[:300]
                if not self.pending:
                    _release_leftovers(self.log)
                if self.tries[tr.key] <= s.retries:  # e.g. killed by the memory monitor: resumes from a checkpoint
                    self.log(f"[hyper_tables] {cells_text(tr.cells)} failed ({reason[:120]}); trying again")
                    self.queue.append(tr)
                    continue
                self.failed.append(f"{tr.key} ({cells_text(tr.cells)}): {reason}")
            _progress_line(self.log, self.results, self.failed, total, self.t0, tr)


def _stopped(signum: int, pending: dict, parent: Any, results: dict, total: int) -> None:
    """After SIGINT/SIGTERM: cancel the trainings in flight, end their runs and the parent KILLED, raise Stopped
    (their checkpoints stay: the same command resumes them)."""
    import ray

    for ref in pending:
        ray.cancel(ref, force=True)
    mark_stale(parent.client, parent.experiment_id, children_filter(parent.run_id))
    parent.end("KILLED")
    raise Stopped(
        signum,
        f"{len(results)} of {total} trainings finished; re-run the same command: finished ones are skipped, the "
        "others resume from their last checkpoints",
    )


def _release_leftovers(log: Any) -> None:
    """Remove the placement groups a dead training left behind, when no other training is in flight. A training
    whose controller is killed (e.g. by Ray's memory monitor) can leave its workers' placement group reserved;
    the next training's Ray Data readers then wait forever for that CPU."""
    import ray
    from ray.util.placement_group import PlacementGroup

    left = [pg for pg, info in ray.util.placement_group_table().items() if info.get("state") == "CREATED"]
    for pg in left:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg)))
    if left:
        log(f"[hyper_tables] released {len(left)} placement group(s) left by the failed training")


def _progress_line(log: Any, results: dict, failed: list, total: int, t0: float, last: Training) -> None:
    n = len(results) + len(failed)
    elapsed = time.perf_counter() - t0
    fresh = [r for r in results.values() if r["trained"] or r["evaluated"]]
    # ETA from the trainings that did work (finished ones found in MLflow cost nothing)
    per = sum(r["seconds"] for r in fresh) / len(fresh) if fresh else float("nan")
    eta = per * (total - n)
    r = results.get(last.key)
    what = (
        "failed"
        if r is None
        else ("trained" if r["trained"] else "found finished")
        + (", evaluated" if r and r["evaluated"] else ", evaluation found")
    )
    log(
        f"[hyper_tables] {n}/{total} done ({len(failed)} failed), {elapsed:.0f} s, ETA "
        f"{'?' if math.isnan(eta) else f'{eta:.0f} s'}: {cells_text(last.cells)} {what}"
    )
