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
import json
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from fewsound.config import cfg_hash, override
from fewsound.errors import ConfigError, Stopped
from tune.spine import GRID_TAG, JOB_TAG, N_TRAININGS_TAG, PAPER_ROWS_TAG, children_filter, mark_stale, open_keyed_run

PAPER_DATASETS = ("VCTK", "noisy VCTK", "LibriSpeech", "LJ Speech", "GTZAN", "UrbanSound8K")
WHISPER_CHECKPOINTS = {"Whisper L": "large-v2", "Whisper T": "tiny.en"}  # Table 5's rows (the paper's text)
TABLE_ROW_HEADERS = {2: "Model", 3: "Target Network", 4: "Target Network", 5: "Encoder", 6: "Target Net."}
# --smoke-test: the paper's two hypernetwork sizes become two tiny ones (still distinct trainings)
SMOKE_PRESETS = {"17.5M": {"preset": "tiny"}, "41.2M": {"preset": "tiny", "hyper_widths": (96, 96)}}
SMOKE_TRAIN = dict(
    epochs=2,
    batch_size=4,
    samples_per_epoch=8,
    val_every=1,
    val_clips=4,
    log_clips=1,
    val_metrics=("mse", "psnr", "si_snr", "lsd"),
    lr=1e-4,
)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One row of one paper table."""

    table: int
    label: str  # as the paper prints it
    kind: str
    target: str
    encoder: str
    preset: str  # the paper's size: "17.5M" | "41.2M"
    dataset: str
    group: str | None = None  # Table 6: the dataset's group
    whisper: str | None = None  # Table 5's Whisper rows: "large-v2" | "tiny.en"


def paper_cells(tables: list[int], datasets: list[str]) -> list[Cell]:
    """Every row of the asked tables. Tables 2-5 are on the first dataset (the paper's VCTK); Table 6 has a
    group per dataset."""
    bad = [t for t in tables if t not in (2, 3, 4, 5, 6)]
    if bad or not tables:
        raise ConfigError("--tables", f"the hypernetwork tables are 2-6, got {tables}")
    if not datasets:
        raise ConfigError("--datasets", "give at least one dataset")
    main = datasets[0]
    cells: list[Cell] = []
    targets = ("nerf", "kan", "siren")
    for t in tables:
        if t == 2:
            cells += [
                Cell(2, "HyperSound", "hypersound", "nerf", "soundstream", "17.5M", main),
                Cell(2, "FewSound 17.5M", "fewsound", "nerf", "soundstream", "17.5M", main),
                Cell(2, "FewSound 41.2M", "fewsound", "nerf", "soundstream", "41.2M", main),
            ]
        elif t in (3, 4):
            kind = "fewsound" if t == 3 else "hypersound"
            cells += [Cell(t, x.upper(), kind, x, "soundstream", "17.5M", main) for x in targets]
        elif t == 5:
            for label, encoder in (
                ("SoundStream", "soundstream"),
                ("Whisper L", "whisper"),
                ("Whisper T", "whisper"),
                ("Spectral", "spectral"),
                ("SNAC", "snac"),
            ):
                cells.append(
                    Cell(5, label, "fewsound", "nerf", encoder, "17.5M", main, None, WHISPER_CHECKPOINTS.get(label))
                )
        else:
            cells += [
                Cell(6, x.upper(), "fewsound", x, "soundstream", "41.2M", ds, group=ds)
                for ds in datasets
                for x in ("nerf", "kan")
            ]
    return cells


@dataclasses.dataclass
class Settings:
    """What every training and evaluation of a grid shares."""

    train: dict[str, Any]  # TrainConfig fields (epochs, ...) for every training
    overrides: dict[str, Any]  # dotted TrainConfig overrides (--set)
    whisper: dict[str, str]  # Whisper checkpoint folder by size ("tiny.en", "large-v2")
    smoke: bool = False
    experiment: str = "hyper_tables"
    storage: str | None = None
    num_workers: int | None = None
    parallel: int | None = None
    address: str | None = None
    clips: int | None = None
    metrics: list[str] | None = None
    long_seconds: float | None = 10.0
    retries: int = 1  # a failed training is tried again this many times (resuming from its last checkpoint)


def train_config(cell: Cell, s: Settings):
    """The TrainConfig of a cell (raises ConfigError for a Whisper row without a checkpoint)."""
    from fewsound.hyper import HyperConfig
    from fewsound.train import TrainConfig

    size = SMOKE_PRESETS[cell.preset] if s.smoke else {"preset": cell.preset}
    extra = {}
    if cell.whisper:
        if cell.whisper not in s.whisper:
            raise ConfigError("--whisper", f"no checkpoint for {cell.whisper} ({cell.label}): give {cell.whisper}=PATH")
        extra["whisper_checkpoint"] = s.whisper[cell.whisper]
    model = HyperConfig(kind=cell.kind, target=cell.target, encoder=cell.encoder, **size, **extra)
    cfg = TrainConfig(model=model, **{**(SMOKE_TRAIN if s.smoke else {}), **s.train})
    return override(cfg, **s.overrides) if s.overrides else cfg


@dataclasses.dataclass
class Training:
    key: str
    cfg: Any  # TrainConfig
    corpus: str
    cells: list[Cell]
    skip: str | None = None  # why it is not run (a Whisper row without a checkpoint)


def plan(cells: list[Cell], corpora: dict[str, str], s: Settings) -> list[Training]:
    """The distinct trainings behind `cells` (cells of the same config and corpus share one), in cell order."""
    from tune.hyper.train import resolve_train_corpus, run_key

    by_key: dict[str, Training] = {}
    for cell in cells:
        try:
            cfg = train_config(cell, s)
        except ConfigError as e:
            by_key.setdefault(f"skip-{cell.table}-{cell.label}", Training("", None, "", [cell], str(e)))
            continue
        corpus = resolve_train_corpus(corpora[cell.dataset], cfg.model.clip_length)
        key = run_key(cfg, corpus, s.experiment)
        by_key.setdefault(key, Training(key, cfg, corpus, []))
        by_key[key].cells.append(cell)
    return list(by_key.values())


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


def cells_text(cells: list[Cell]) -> str:
    return "; ".join(f"Table {c.table}: {c.label}" + (f" ({c.group})" if c.group else "") for c in cells)


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
    markdown = _finish_parent(parent, cells, trainings, results, s, not_run, failed)
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


def table_rows(table: int, cells: list[Cell], trainings: list[Training], results: dict) -> list[dict[str, Any]]:
    """The table's per-clip rows, relabelled with the paper's row labels (Table 6: grouped by dataset)."""
    rows = []
    for tr in trainings:
        r = results.get(tr.key)
        for cell in tr.cells:
            if cell.table != table or r is None:
                continue
            rows += [
                {**row, "label": cell.label, "group": cell.group, "run_id": r["run_id"]} for row in r["evaluation"].rows
            ]
    return rows


def long_table_rows(trainings: list[Training], results: dict) -> list[dict[str, Any]]:
    """Every training's long-audio rows, labelled by its first paper row ("T3 KAN, windowed")."""
    rows = []
    for tr in trainings:
        r = results.get(tr.key)
        if r is None:
            continue
        c = tr.cells[0]
        name = f"T{c.table} {c.label}" + (f" ({c.group})" if c.group else "")
        rows += [
            {**row, "label": f"{name}, {row['variant']}", "run_id": r["run_id"]} for row in r["evaluation"].long_rows
        ]
    return rows


def _finish_parent(parent, cells, trainings, results, s: Settings, not_run: list[str], failed: list[str]) -> str:
    """Tables and spectrogram grids on the parent run; returns every table as Markdown."""
    from fewsound import tables

    parts = []
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        for table in sorted({c.table for c in cells}):
            mine = [c for c in cells if c.table == table]
            spec = dict(
                title=f"Table {table}: {tables.paper_tables()[table]['caption']}",
                row_header=TABLE_ROW_HEADERS[table],
                paper_table=table,
                label_order=list(dict.fromkeys(c.label for c in mine)),
                keep_empty=True,
                group_order=list(dict.fromkeys(c.group for c in mine if c.group)),
            )
            rows = table_rows(table, cells, trainings, results)
            if not rows:
                parts.append(f"### {spec['title']}\n\n(no finished row)\n")
                continue
            tables.write_results(out / f"table_{table}", rows, **spec)
            parts.append((out / f"table_{table}" / "table.md").read_text())
            _spectrogram_grids(out / "plots", table, mine, trainings, results)
        long_rows = long_table_rows(trainings, results)
        if long_rows:
            spec = dict(title="Long audio: window by window (crossfaded) vs one window", row_header="Model")
            tables.write_results(out / "long_audio", long_rows, **spec)
            parts.append((out / "long_audio" / "table.md").read_text())
        notes = [f"- not run: {x}" for x in not_run] + [f"- failed: {x}" for x in failed]
        markdown = "\n".join(parts) + ("\n" + "\n".join(notes) + "\n" if notes else "")
        (out / "tables.md").write_text(markdown)
        (out / "runs.json").write_text(json.dumps({k: r["run_id"] for k, r in results.items()}, indent=1))
        parent.log_artifact(out, "tables")
    parent.log_metrics(
        {
            "grid/trainings": float(len([t for t in trainings if t.skip is None])),
            "grid/finished": float(len(results)),
            "grid/failed": float(len(failed)),
            "grid/not_run": float(len(not_run)),
        }
    )
    parent.end("FAILED" if failed else "FINISHED")
    return markdown


def _spectrogram_grids(folder: Path, table: int, cells: list[Cell], trainings: list[Training], results: dict) -> None:
    """plots/table_N[_dataset].png: one validation clip's ground truth, then every row's reconstruction of it."""
    from fewsound.report import save_figure, spectrogram_comparison_figure

    of_cell = {(c.table, c.label, c.group): results.get(t.key) for t in trainings for c in t.cells}
    for group in dict.fromkeys(c.group for c in cells):
        preds, ref, clip, sr = {}, None, None, 22_050
        for c in cells:
            r = of_cell.get((c.table, c.label, c.group))
            ev = r["evaluation"] if r else None
            if ev is None or ev.example is None or (ref is not None and ev.example.shape != ref.shape):
                continue
            ref, clip = (ev.example_ref, ev.example_id) if ref is None else (ref, clip)
            preds[c.label] = ev.example
            sr = next(t.cfg.model.sample_rate for t in trainings if t.key == r["key"])
        if ref is None:
            continue
        name = f"table_{table}" + (f"_{group.replace(' ', '_')}" if group else "")
        title = f"Table {table}" + (f" ({group})" if group else "") + f": {clip}"
        save_figure(spectrogram_comparison_figure(ref, preds, sr, title=title), folder / f"{name}.png")


def parse_datasets(text: str | None, smoke: bool) -> dict[str, str | None]:
    """--datasets "NAME=CORPUS,..." -> {name: corpus folder}; None: the built-in corpus under the name "builtin"
    (in a smoke test: under every name of Table 6, so that its shape is complete)."""
    if not text:
        return {name: None for name in PAPER_DATASETS} if smoke else {"builtin": None}
    out: dict[str, str | None] = {}
    for item in text.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError("--datasets", f"expected NAME=CORPUS (e.g. VCTK=/data/vctk-fs), got {item!r}")
        out[name.strip()] = None if path.strip() == "builtin" else path.strip()
    return out
