"""Stopping a driver cleanly: SIGINT (Ctrl+C) and SIGTERM (`kill`, a scheduler, `ray job stop`) end a sweep within
seconds, with one line saying what finished and what a re-run does.

    with StopOnSignal() as stop:
        tuner = tune.Tuner(..., run_config=tune.RunConfig(stop=stop.stopper, ...))
        grid = tuner.fit()
    if stop.signal:                      # the trials were stopped: record nothing as failed
        ...
        raise Stopped(stop.signal, "3 of 12 fits finished; re-run the same command to do the other 9")

Without this, SIGTERM reaches Ray's own handler in the driver, which aborts it with a C++ stack trace (exit code
134), and Tune's SIGINT handler ends the run as if its trials had failed. Here both signals only set a flag;
Tune's public Stopper API (`stop_all`) then ends every trial and `tuner.fit()` returns. A second signal while
stopping raises KeyboardInterrupt (the user insists). Tune's own SIGINT handler is switched off with its
documented TUNE_DISABLE_SIGINT_HANDLER setting, so one handler decides.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

from ray import tune

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised by `interrupt_on_signal` in the main thread: `signum` says which signal arrived."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class interrupt_on_signal:  # noqa: N801 (used as a `with` statement, like contextlib's)
    """Within the block, SIGINT and SIGTERM raise Interrupted in the main thread: for drivers that wait in a
    blocking call with no stop API of their own (Ray Train's `trainer.fit()`), so that SIGTERM never reaches
    Ray's handler (a C++ stack trace, exit code 134). Ray may turn the exception into a plain KeyboardInterrupt
    on its way out of a blocking call: `signum` keeps which signal it was. Outside the main thread it does
    nothing."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self.signum: int | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        raise Interrupted(signum)

    def __enter__(self) -> interrupt_on_signal:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()


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
    """Within the block, SIGINT and SIGTERM set `signal` (the first one's number) instead of killing the driver;
    the previous handlers come back at exit. Outside the main thread (a driver run from a thread, e.g. tests),
    signals cannot be caught: it does nothing and `signal` stays None."""

    def __init__(self) -> None:
        self.stopper = _StopAll()
        self._previous: dict[int, Any] = {}
        self._env: str | None = None

    @property
    def signal(self) -> int | None:
        return self.stopper.signal

    def _handle(self, signum: int, frame: FrameType | None) -> None:
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
            self._env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python
        self._previous.clear()
        if self._env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._env
