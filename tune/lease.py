"""One driver per sweep: a lease with a heartbeat, kept as a tag of the sweep's MLflow experiment.

A user's second terminal running the same command would otherwise fit every unfinished fit a second time (both
drivers see the same keys as not finished). The driver that opens a sweep takes its lease; a second driver of
the same sweep, while the first one's heartbeat is fresh, is refused with one line saying who holds it. A lease
whose heartbeat is older than `stale_after`, or whose driver process is gone from this host, is taken over, so
a killed driver never blocks the re-run (on another host, for at most `stale_after`).

The lease is an experiment tag `fewsound.lease.<sweep id>` = JSON {owner, host, pid, heartbeat}. MLflow has no
compare-and-set, so taking it is write, wait `settle` seconds, read back: of two drivers starting together the
last writer holds it and the other sees that and backs off. The same process may take its own lease again (a
notebook re-running a sweep after an error).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from fewsound.errors import BusyError
from tune.spine import LEASE_PREFIX

_ACTIVE: dict[str, SweepLease] = {}  # the leases this process holds, by sweep id


class SweepLease:
    """The lease of sweep `sid` in experiment `exp_id`; `acquire()` raises BusyError when another live driver
    holds it, then a daemon thread renews it every `interval` seconds until `release()`."""

    def __init__(
        self, client: Any, exp_id: str, sid: str, interval: float = 15.0, stale_after: float = 60.0, settle: float = 1.0
    ):
        self.client, self.exp_id, self.sid = client, exp_id, sid
        self.interval, self.stale_after, self.settle = interval, stale_after, settle
        self.tag = f"{LEASE_PREFIX}{sid}"
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.owner = f"{self.me['host']}:{self.me['pid']}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        """The lease as stored (None: nobody holds it)."""
        value = self.client.get_experiment(self.exp_id).tags.get(self.tag)
        try:
            return json.loads(value) if value else None
        except ValueError:
            return None

    def _mine(self, lease: dict[str, Any] | None) -> bool:
        return lease is None or lease.get("owner") == self.owner or _same_process(lease, self.me)

    def _write(self) -> None:
        value = json.dumps({"owner": self.owner, **self.me, "heartbeat": time.time()})
        self.client.set_experiment_tag(self.exp_id, self.tag, value)

    def acquire(self) -> SweepLease:
        earlier = _ACTIVE.pop(self.sid, None)  # this process ran the sweep before (and ended by an exception)
        if earlier is not None:
            earlier.release()
        held = self.holder()
        if not self._mine(held) and not self._stale(held):
            raise self._busy(held)
        self._write()
        time.sleep(self.settle)  # another driver writing at the same moment: the last writer wins
        held = self.holder()
        if held is not None and held.get("owner") != self.owner:
            raise self._busy(held)
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.sid}", daemon=True)
        self._thread.start()
        _ACTIVE[self.sid] = self
        return self

    def release(self) -> None:
        if _ACTIVE.get(self.sid) is self:
            del _ACTIVE[self.sid]
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if (self.holder() or {}).get("owner") == self.owner:
                self.client.delete_experiment_tag(self.exp_id, self.tag)
        except Exception:  # the server is away: the lease goes stale by itself
            pass

    def _renew(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write()
            except Exception:  # a server restart or a network blip: try again at the next beat
                pass

    def _stale(self, lease: dict[str, Any] | None) -> bool:
        if lease is None or time.time() - float(lease.get("heartbeat", 0)) > self.stale_after:
            return True
        return lease.get("host") == self.me["host"] and not _alive(int(lease.get("pid") or 0))

    def _busy(self, lease: dict[str, Any] | None) -> BusyError:
        lease = lease or {}
        ago = time.time() - float(lease.get("heartbeat", 0))
        return BusyError(
            self.sid,
            f"another driver is running this sweep (pid {lease.get('pid')} on {lease.get('host')}, alive "
            f"{ago:.0f} s ago); wait for it to end or stop it (Ctrl+C / kill PID), then re-run: finished fits "
            f"are skipped (a killed driver's claim lapses after {self.stale_after:.0f} s)",
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return pid > 0


def _same_process(lease: dict[str, Any], me: dict[str, Any]) -> bool:
    return lease.get("host") == me["host"] and lease.get("pid") == me["pid"]


def take_lease(uri: str, experiment: str, sid: str) -> SweepLease:
    """The lease of sweep (or search) `sid` in `experiment` on the tracking server at `uri`, taken (BusyError
    when another live driver holds it)."""
    from mlflow.tracking import MlflowClient

    from fewsound.tracking import get_or_create_experiment

    client = MlflowClient(tracking_uri=uri)
    return SweepLease(client, get_or_create_experiment(client, experiment), sid).acquire()
