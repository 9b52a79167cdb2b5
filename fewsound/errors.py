"""One exception type per kind of user mistake.

Each carries *what* (a path or a config key) and *why*, so a job can print it on one line and exit non-zero
instead of showing a traceback from deep inside torch.
"""

from __future__ import annotations

import signal


class FewsoundError(Exception):
    """Base class of every error that is the user's input's fault (not a bug in fewsound)."""

    def __init__(self, where: object, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")

    def __reduce__(self):
        # pickle (Ray ships a task's exception to the driver) must rebuild it from (where, problem)
        return type(self), (self.where, self.problem)


class AudioError(FewsoundError):
    """An audio file (or array) is unreadable, empty, too short, silent or contains NaN/Inf."""


class ConfigError(FewsoundError):
    """A configuration key or value is invalid (unknown family, bad width, wrong type, ...)."""


class DataError(FewsoundError):
    """A prepared corpus (Parquet shards + manifest.json) or a source folder is missing or malformed."""


class TrackingError(FewsoundError):
    """The MLflow tracking server cannot be reached; says which server and where the results were kept."""


class BusyError(FewsoundError):
    """Another live driver is running the same sweep (a second terminal running the same command)."""


class Stopped(Exception):
    """A driver stopped by a signal, after cleaning up; the job prints it as its last line and exits with
    `exit_code` (the shell's 128 + signal number)."""

    def __init__(self, signum: int, what: str):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}: {what}")
