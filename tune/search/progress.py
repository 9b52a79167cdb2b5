"""What a search prints: its first line (what it runs, what it resumes) and one line per ended trial (done /
stopped early / remaining / best so far / ETA)."""

from __future__ import annotations

import time
from typing import Any

from ray import tune

from tune.search.results import SearchContext
from tune.spine import (
    eta_seconds,
    fmt_duration,
)


def print_start(
    ctx: SearchContext,
    trials: int,
    mode: str,
    max_params: int | None,
    fitting: list[tuple[str, dict[str, Any]]],
    study_uri: str,
    done_before: int,
    todo: int,
    interrupted: int,
) -> None:
    """The search's first line: what it fits, from where, what is left, where it logs."""
    print(
        f"[search_inr] {ctx.name}: {trials} trials of {ctx.steps} steps on {len(ctx.clips)} clips, objective "
        f"{ctx.objective} ({mode}), budget {max_params or 'none'}; starts from {', '.join(n for n, _ in fitting)}"
        f"; study {study_uri}"
        + (f" ({done_before} trials already ended, {todo} to run)" if done_before or interrupted else "")
        + (f"; {interrupted} trials in flight when it stopped are refitted" if interrupted else "")
        + f"; MLflow {ctx.tracking_uri} experiment {ctx.experiment!r}",
        flush=True,
    )


class SearchProgress(tune.Callback):
    """One line per ended trial: done / stopped early / remaining / best so far / ETA."""

    def __init__(self, total: int, before: int, mode: str, t0: float):
        self.total, self.before, self.mode, self.t0 = total, before, mode, t0
        self.ended = self.stopped = 0
        self.best = None

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended += 1
        r = trial.last_result or {}
        if r.get("final") != 1:
            self.stopped += 1
        elif self.best is None or (r["objective"] > self.best if self.mode == "max" else r["objective"] < self.best):
            self.best = r["objective"]
        elapsed = time.perf_counter() - self.t0
        done = self.before + self.ended
        eta = eta_seconds(self.ended, self.total - self.before, elapsed)
        print(
            f"[search_inr] trials done {done}/{self.total}  stopped early {self.stopped}  remaining "
            f"{self.total - done}  best now {self.best if self.best is None else f'{self.best:.4g}'}  "
            f"ETA {fmt_duration(eta)}",
            flush=True,
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self.on_trial_complete(iteration, trials, trial)
