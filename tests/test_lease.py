"""One driver per sweep (tune.lease), against the session's real MLflow server: a second driver is refused
while the first one's heartbeat is fresh, a dead driver's lease is taken over, and releasing frees it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from fewsound.errors import BusyError
from fewsound.tracking import get_or_create_experiment
from tune.lease import SweepLease


@pytest.fixture
def exp(env):
    from mlflow.tracking import MlflowClient

    _, uri = env
    client = MlflowClient(tracking_uri=uri)
    return client, get_or_create_experiment(client, "test-lease")


def _other_driver(client, exp_id: str, sid: str, pid: int, heartbeat: float, host: str | None = None) -> None:
    """The lease as another driver process writes it."""
    import socket

    lease = {"owner": f"x:{pid}:other", "host": host or socket.gethostname(), "pid": pid, "heartbeat": heartbeat}
    client.set_experiment_tag(exp_id, f"fewsound.lease.{sid}", json.dumps(lease))


def test_a_live_driver_holds_the_sweep_and_a_dead_ones_lease_is_taken_over(exp):
    client, exp_id = exp
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live driver on this host
    try:
        _other_driver(client, exp_id, "sweep-a", other.pid, time.time())
        with pytest.raises(BusyError, match=f"another driver is running this sweep \\(pid {other.pid} on "):
            SweepLease(client, exp_id, "sweep-a", settle=0.1).acquire()
        _other_driver(client, exp_id, "sweep-a", other.pid, time.time(), host="another-node")
        with pytest.raises(BusyError):  # on another node: its heartbeat is all we know
            SweepLease(client, exp_id, "sweep-a", settle=0.1).acquire()
    finally:
        other.kill()
        other.wait()
    _other_driver(client, exp_id, "sweep-a", other.pid, time.time())  # gone from this host: taken over at once
    lease = SweepLease(client, exp_id, "sweep-a", settle=0.1).acquire()
    assert lease.holder()["owner"] == lease.owner
    lease.release()
    assert lease.holder() is None
    _other_driver(client, exp_id, "sweep-a", 1, time.time() - 120, host="another-node")  # no heartbeat for 2 min
    before = SweepLease(client, exp_id, "sweep-a", settle=0.1)
    assert before.holder()["owner"] == "x:1:other"
    lease = before.acquire()
    try:
        held = lease.holder()  # taken over: this driver's name and a fresh heartbeat replace the dead one's
        assert held["owner"] == lease.owner != "x:1:other" and held["host"] != "another-node"
        assert time.time() - held["heartbeat"] < 60
    finally:
        lease.release()
    assert lease.holder() is None


def test_the_lease_is_renewed_and_other_sweeps_are_free(exp):
    client, exp_id = exp
    lease = SweepLease(client, exp_id, "sweep-b", interval=0.2, settle=0.1).acquire()
    try:
        first = lease.holder()["heartbeat"]
        time.sleep(1.0)
        assert lease.holder()["heartbeat"] > first
        SweepLease(client, exp_id, "sweep-c", settle=0.1).acquire().release()  # another sweep: no conflict
        again = SweepLease(client, exp_id, "sweep-b", settle=0.1).acquire()  # the same process (a notebook re-run)
        assert lease._stop.is_set() and again.holder()["owner"] == again.owner
        again.release()
    finally:
        lease.release()
