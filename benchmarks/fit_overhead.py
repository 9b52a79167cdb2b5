"""What a sweep spends per fit outside the fit and the paper's metrics: bytes stored and CPU per step, the new way
(tune/sweep/trial.py today) against the old way, measured in the same run on the same fits.

    python benchmarks/fit_overhead.py [--clips 8] [--families nerf,siren] [--steps 50]

Real clips of the built-in corpus (builtin:inr-1.5s: 1.5 s at 22,050 Hz), fitted for real (a few steps: only what
happens after the fit is measured), evaluated (MSE/PSNR: the paper's metrics are measured in metrics_speed.py),
then each fit is stored and logged twice, against one real local MLflow server (fewsound's embedded server, a
fresh store), one experiment per way:

  new  through tune/sweep/trial.py's own functions, in run_pack's order: each clip's target once per sweep
       (put_targets: 16-bit FLAC), each fit's record (write_record: 16-bit FLAC prediction + the numpy/Pillow
       palette spectrogram), the child runs (log_records -> tune.sweep.durable: the target on the parent run, the
       files in the child run, then released from the record: one durable copy)
  old  the baseline: a matplotlib spectrogram (fewsound.report.save_spectrogram_png) and two float32 WAVs
       (gt.wav, pred.wav) per fit, written into the record and logged as the child run's artifacts through the
       same log_records, the record keeping its copy (what trial.py did before)

Per fit: CPU ms of each step (spectrogram, audio encode, record write, MLflow logging: this process, the client,
all its threads; plus the tracking server's CPU from /proc via psutil), and bytes stored, read from disk after
the writes: the records folder and the server's artifact folder of each way's experiment. Bytes per fit are
given at the measured fits per clip (len(families)) and at one fit per clip (the target not shared).
Prints the figures and ratios, writes benchmarks/results/fit_overhead.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CORPUS = "builtin:inr-1.5s"
LENGTH = 32_768  # 1.5 s at 22,050 Hz


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def old_artifact_files(key: str, ref: Any, pred: Any, sr: int) -> tuple[dict[str, bytes], float, float]:
    """The baseline: gt.wav and pred.wav (float32 WAV) and the matplotlib spectrogram, as bytes; with the CPU
    seconds of the audio and of the spectrogram."""
    from fewsound.data.audio import save_audio
    from fewsound.report import save_spectrogram_png

    with tempfile.TemporaryDirectory() as d:
        c0 = time.process_time()
        save_audio(Path(d) / "audio" / "gt.wav", ref, sr)
        save_audio(Path(d) / "audio" / "pred.wav", pred, sr)
        c1 = time.process_time()
        save_spectrogram_png(Path(d) / "plots" / "spectrogram.png", ref, pred, sr, title=key)
        c2 = time.process_time()
        rels = ("audio/gt.wav", "audio/pred.wav", "plots/spectrogram.png")
        return {rel: (Path(d) / rel).read_bytes() for rel in rels}, c1 - c0, c2 - c1


@contextlib.contextmanager
def records_keep_their_files() -> Iterator[None]:
    """The baseline's logging: tune.sweep.durable's replay as before, the record keeping its copy of the files (no
    release once the run holds them)."""
    from fewsound import records

    release = records.release_files
    records.release_files = lambda *a, **k: None
    try:
        yield
    finally:
        records.release_files = release


class Clock:
    """CPU seconds of this process and of the tracking server (its process tree), per named step."""

    def __init__(self, server: Any):
        self.server = server
        self.cpu: dict[str, float] = {}

    def server_cpu(self) -> float:
        procs = [self.server, *self.server.children(recursive=True)]
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    def add(self, step: str, seconds: float) -> None:
        self.cpu[step] = self.cpu.get(step, 0.0) + seconds


def fit_all(args: argparse.Namespace) -> list[tuple[list[Any], list[Any], Any, list[Any]]]:
    """Per family: (tasks, fit results, clips [B, N], evaluations): real fits of the corpus's first clips."""
    import numpy as np

    from fewsound.data.corpus import open_corpus
    from fewsound.fit import FitConfig
    from fewsound.plan import FitTask
    from tune.sweep.context import TrialContext, load_clip
    from tune.sweep.trial import _evaluate, _fit_pack

    infos = open_corpus(CORPUS).infos()[: args.clips]
    clips = np.stack([load_clip(CORPUS, i.clip_id, LENGTH) for i in infos])
    ctx = TrialContext(corpus=CORPUS, experiment="-", parent_run_id="-", sweep="-", tracking_uri="-",
                       metrics=("mse", "psnr"))  # fmt: skip
    out = []
    for family in args.families.split(","):
        cfg = FitConfig(family=family, steps=args.steps, log_every=max(1, args.steps // 4))
        tasks = [FitTask(cfg, i.clip_id, i.kind, LENGTH, family.upper()) for i in infos]
        results, _, _, _ = _fit_pack(tasks, clips, ctx)
        evals, errors = _evaluate(tasks, results, clips, ctx)
        assert not errors, errors
        out.append((tasks, results, clips, evals))
    return out


def run_new(fits: list, ctx: Any, clock: Clock) -> None:
    """The new way, through tune/sweep/trial.py's functions in run_pack's order."""
    from fewsound.data.audio import flac_bytes
    from fewsound.report import spectrogram_png
    from tune.sweep import context as trial
    from tune.sweep import record

    for tasks, results, clips, evals in fits:
        pid = trial.pack_id(tasks)
        c = time.process_time()
        targets = record.put_targets(tasks, results, clips, ctx)
        clock.add("target (encode + write, once per clip)", time.process_time() - c)
        recs = []
        for i, task in enumerate(tasks):
            pred, ref = results[i].reconstruction, clips[i]
            c0 = time.process_time()
            spectrogram_png(ref, pred, task.cfg.sample_rate, title=task.key)  # the same calls write_record makes,
            c1 = time.process_time()  # timed one by one
            flac_bytes(pred, task.cfg.sample_rate)
            c2 = time.process_time()
            recs.append(record.write_record(task, results[i], evals[i], None, targets[i], ctx, pid, 1, False))
            c3 = time.process_time()
            clock.add("spectrogram", c1 - c0)
            clock.add("audio encode", c2 - c1)
            clock.add("record write", (c3 - c2) - (c2 - c0))  # write_record less its spectrogram and encode
        s, c = clock.server_cpu(), time.process_time()
        kept = record.log_records(ctx, pid, recs)
        assert kept == 0, f"{kept} records not logged"
        clock.add("MLflow logging (client)", time.process_time() - c)
        clock.add("MLflow logging (server)", clock.server_cpu() - s)


def run_old(fits: list, ctx: Any, clock: Clock) -> None:
    """The baseline: the old files per fit, in the record and (a second copy) in the child run; the same logging
    path (tune/sweep/record.py's log_records, so the same per-pack calls: health, run search)."""
    from fewsound import records
    from fewsound.records import FitRecord
    from tune.sweep import context as trial
    from tune.sweep import record

    for tasks, results, clips, evals in fits:
        pid = trial.pack_id(tasks)
        recs = []
        for i, task in enumerate(tasks):
            spec = record._run_spec(task, results[i], evals[i], ctx, pid, None, 1, False)
            files, audio_s, spec_s = old_artifact_files(task.key, clips[i], results[i].reconstruction, 22_050)
            c = time.process_time()
            rec = records.write_record(ctx.records_root, FitRecord(key=task.key, sweep=ctx.sweep, **spec), files)
            clock.add("record write", time.process_time() - c)
            clock.add("spectrogram", spec_s)
            clock.add("audio encode", audio_s)
            recs.append(rec)
        s, c = clock.server_cpu(), time.process_time()
        with records_keep_their_files():
            kept = record.log_records(ctx, pid, recs)
        assert kept == 0, f"{kept} records not logged"
        clock.add("MLflow logging (client)", time.process_time() - c)
        clock.add("MLflow logging (server)", clock.server_cpu() - s)


def warm_up(fits: list) -> None:
    """First calls (imports, matplotlib's font cache, the colour table) outside the timings."""
    from fewsound.data.audio import flac_bytes
    from fewsound.report import spectrogram_png

    tasks, results, clips, _ = fits[0]
    spectrogram_png(clips[0], results[0].reconstruction, 22_050)
    flac_bytes(clips[0], 22_050)
    old_artifact_files("warm-up", clips[0], results[0].reconstruction, 22_050)


def main(argv: list[str] | None = None) -> int:
    import psutil
    from mlflow.tracking import MlflowClient

    from fewsound import tracking
    from fewsound.tracking import get_or_create_experiment
    from tune.sweep.context import TrialContext
    from tune.sweep.durable import client_defaults

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--families", default="nerf,siren", help="comma-separated; each fits every clip")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "fit_overhead.json"))
    args = p.parse_args(argv)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    client_defaults()

    t = time.perf_counter()
    fits = fit_all(args)
    n_fits, n_families = sum(len(f[0]) for f in fits), len(fits)
    print(f"fitted {n_fits} fits ({n_families} families x {args.clips} clips, {args.steps} steps) in "
          f"{time.perf_counter() - t:.0f} s")  # fmt: skip
    warm_up(fits)

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        uri = tracking.start_local_server(home=home, port=None)
        try:
            server = psutil.Process(json.loads((home / "server.json").read_text())["pid"])
            client = MlflowClient(tracking_uri=uri)
            result: dict[str, Any] = {}
            warm: set[str] = set()
            # a first pass of each way warms the server (its lazy imports, SQLite's pages) and is not counted
            for way in ("old", "new", "old", "new"):
                name = f"fit_overhead-{way}" + ("" if way in warm else "-warm-up")
                exp_id = get_or_create_experiment(client, name)
                parent = client.create_run(exp_id, run_name="parent").info.run_id
                root = Path(tmp) / f"records-{name}"
                ctx = TrialContext(corpus=CORPUS, experiment=name, parent_run_id=parent, sweep="sw", tracking_uri=uri,
                                   experiment_id=exp_id, records=str(root))  # fmt: skip
                clock = Clock(server)
                wall = time.perf_counter()
                if way == "new":
                    run_new(fits, ctx, clock)
                else:
                    run_old(fits, ctx, clock)
                wall = time.perf_counter() - wall
                client.set_terminated(parent)
                if way not in warm:
                    warm.add(way)
                    continue
                art = home / "artifacts" / exp_id
                targets = folder_bytes(art / parent / "artifacts" / "targets")
                stored = {"records": folder_bytes(root), "mlflow_artifacts": folder_bytes(art)}
                result[way] = summarize(clock, stored, targets, n_fits, args.clips, wall)
        finally:
            tracking.stop_local_server(home)

    ratios = {
        "bytes_per_fit": result["old"]["bytes_per_fit"] / result["new"]["bytes_per_fit"],
        "cpu_ms_per_fit": result["old"]["cpu_ms_per_fit"] / result["new"]["cpu_ms_per_fit"],
        **{
            f"cpu {step}": result["old"]["cpu_ms"][step] / max(result["new"]["cpu_ms"][step], 1e-9)
            for step in ("spectrogram", "audio encode", "record write", "MLflow logging (client)")
        },
    }
    report(result, ratios)
    out = {
        "benchmark": "fit_overhead",
        "clips": args.clips,
        "families": args.families.split(","),
        "steps": args.steps,
        "fits": n_fits,
        "clip_seconds": LENGTH / 22_050,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg_1m": os.getloadavg()[0]},
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "budget": {"bytes_per_fit": 150_000, "cpu_ms_per_fit": 50.0},
        "ways": result,
        "ratios_old_over_new": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def summarize(clock: Clock, stored: dict[str, int], targets: int, n_fits: int, n_clips: int, wall: float) -> dict:
    """Per-fit figures of one way. cpu_ms_per_fit: this process's CPU (the sweep's worker); the server's apart."""
    cpu_ms = {k: 1000 * v / n_fits for k, v in clock.cpu.items()}
    client_ms = sum(v for k, v in cpu_ms.items() if "server" not in k)
    total = sum(stored.values())
    per_clip_target = targets / n_clips
    return {
        "cpu_ms": cpu_ms,
        "cpu_ms_per_fit": client_ms,
        "server_cpu_ms_per_fit": cpu_ms.get("MLflow logging (server)", 0.0),
        "wall_ms_per_fit": 1000 * wall / n_fits,
        "bytes": stored,
        "bytes_per_fit": total / n_fits,
        # the same store with one fit per clip: each fit carries a whole target (none when the way has none)
        "bytes_per_fit_one_fit_per_clip": (total - targets) / n_fits + per_clip_target,
        "target_bytes_per_clip": per_clip_target,
    }


def report(result: dict, ratios: dict) -> None:
    steps = list(dict.fromkeys([*result["old"]["cpu_ms"], *result["new"]["cpu_ms"]]))
    print(f"{'per fit':45s} {'old':>10s} {'new':>10s} {'old/new':>8s}")
    for step in steps:
        o, n = result["old"]["cpu_ms"].get(step, 0.0), result["new"]["cpu_ms"].get(step, 0.0)
        print(f"{'CPU ms, ' + step:45s} {o:10.1f} {n:10.1f} {o / n if n else float('inf'):8.1f}")
    for key, label in [("cpu_ms_per_fit", "CPU ms, this process (budget 50)"), ("wall_ms_per_fit", "wall ms"),
                       ("bytes_per_fit", "KB stored (budget 150)"),
                       ("bytes_per_fit_one_fit_per_clip", "KB stored, one fit per clip")]:  # fmt: skip
        o, n = result["old"][key], result["new"][key]
        scale = 1e-3 if "bytes" in key else 1.0
        print(f"{label:45s} {o * scale:10.1f} {n * scale:10.1f} {o / n:8.1f}")
    for way in ("old", "new"):
        b = result[way]["bytes"]
        print(f"{way}: records {b['records'] / 1e6:.2f} MB, MLflow artifacts {b['mlflow_artifacts'] / 1e6:.2f} MB")


if __name__ == "__main__":
    sys.exit(main())
