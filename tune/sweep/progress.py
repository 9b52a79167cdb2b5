"""Tune callbacks of a sweep: each finished pack's result collected and a line printed (done / failed / remaining
/ ETA / fits per hour), and the tracking server watched between packs."""

from __future__ import annotations

import time
from typing import Any

from ray import tune

from tune.spine import (
    eta_seconds,
    fmt_duration,
)
from tune.sweep.durable import TrackingWatch


class Progress(tune.Callback):
    """Collects every pack's result; with `show`, one line per finished pack: done / failed / remaining / ETA /
    fits per hour."""

    def __init__(self, name: str, total: int, t0: float, show: bool):
        self.name, self.total, self.t0, self.show = name, total, t0, show
        self.done = self.failed = self.kept = 0
        self.results: list[dict[str, Any]] = []
        self.reported: dict[str, int] = {}  # trial id -> fits it reported
        self.counted: dict[str, set[Any]] = {}  # trial id -> packs whose fits are counted

    def _line(self, note: str = "") -> None:
        if not self.show:
            return
        elapsed = time.perf_counter() - self.t0
        n = self.done + self.failed
        rate = n / elapsed * 3600 if elapsed > 0 else 0.0
        remaining = self.total - n
        eta = eta_seconds(n, self.total, elapsed)
        print(
            f"[{self.name}] done {self.done}  failed {self.failed}  remaining {remaining}  "
            f"ETA {fmt_duration(eta)}  {rate:.0f} fits/h{note}",
            flush=True,
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "fits_done" not in result:
            return
        self.results.append({k: v for k, v in result.items() if k != "config"})
        self.kept += int(result.get("fits_kept", 0))
        counted = self.counted.setdefault(trial.trial_id, set())
        if result.get("pack") not in counted:  # a retried trial re-runs packs that reported already: not again
            counted.add(result.get("pack"))
            # fits_skipped: recorded by an earlier attempt of this trial that died before it reported them
            n = int(result.get("fits_done", 0)) + int(result.get("fits_skipped", 0))
            self.done += n
            self.failed += int(result.get("fits_failed", 0))
            self.reported[trial.trial_id] = self.reported.get(trial.trial_id, 0) + n + int(result.get("fits_failed", 0))
        self._line(f"  ({self.kept} kept in storage for MLflow, logged at the end)" if self.kept else "")

    def on_trial_error(self, iteration, trials, trial, **info):
        lost = sum(len(p["clips"]) for p in trial.config["trial"]["packs"]) - self.reported.get(trial.trial_id, 0)
        self.failed += lost
        self._line(f"  (a trial crashed beyond its retries: its {lost} unreported fits are recorded FAILED)")


class ServerWatch(tune.Callback):
    """Checks the tracking server between packs and every few seconds of Tune's loop (TrackingWatch.poll): the
    driver's embedded server is restarted on its store and port when it died."""

    def __init__(self, watch: TrackingWatch):
        self.watch = watch

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.watch.poll(every=2.0)

    def on_step_end(self, iteration, trials, **info):
        self.watch.poll()
