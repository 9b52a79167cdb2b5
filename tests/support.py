"""What the tests share besides fixtures: the repository's paths, free ports, and a private Ray head.

head = RayHead(root, env, extra=["--num-cpus", "2"], dashboard=True).start()    # ray start --head --block
... head.gcs, head.dashboard ...
head.stop()                                    # the head and everything it started (autoscaled nodes too)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # ray, mlflow: the venv's own commands


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the caller binds it soon after; servers retry when it was taken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A private `ray start --head --block` for one test module: its own temp dir (short: Ray's unix socket paths
    have a length limit) and every port it opens chosen free, in its own session so that it never meets another
    Ray on the machine.

    extra: more `ray start` options (CPUs, an autoscaling config, ...). dashboard: the dashboard on a free port
    (`ray job submit` needs it), else none. host: the GCS's address (an autoscaling config names it). cwd: the
    head's folder. start() waits until the head answers (its log says it started; with a dashboard, `ray job list`
    answers) and retries a start that failed (Ray gives its raylet 30 s to register, which a loaded machine can
    miss)."""

    def __init__(
        self,
        root: Path,
        env: dict[str, str],
        *,
        extra: list[str],
        dashboard: bool,
        host: str = "127.0.0.1",
        cwd: Path | None = None,
    ):
        self.root, self.env, self.extra, self.with_dashboard, self.host = root, env, extra, dashboard, host
        self.cwd = cwd or root  # where jobs submitted without --working-dir run
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        self.dash_port = free_port()
        self.temp_dir = Path(f"/tmp/fsrt_{secrets.token_hex(3)}")
        self.log_path = root / "ray_head.log"

    @property
    def gcs(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    def command(self) -> list[str]:
        ports = ["--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--metrics-export-port", "--runtime-env-agent-port"]  # fmt: skip
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(self.port),
               "--temp-dir", str(self.temp_dir), "--disable-usage-stats", *self.extra]  # fmt: skip
        if self.with_dashboard:
            cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash_port)]
        else:
            cmd += ["--include-dashboard", "false"]
        for option in ports:
            cmd += [option, str(free_port())]
        return cmd

    def start(self, attempts: int = 3, timeout: float = 180) -> RayHead:
        """spawn() and wait_ready(), retried on fresh ports when the head did not come up."""
        for attempt in range(attempts):
            self.spawn(attempt)
            if self.wait_ready(timeout):
                return self
            self.stop()
            self.port, self.dash_port = free_port(), free_port()
        raise AssertionError(f"the Ray head did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def spawn(self, attempt: int = 0) -> RayHead:
        """Start the head's process and return at once (wait_ready() waits for it)."""
        self.log_path = self.root / f"ray_head{attempt}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), env=self.env, cwd=self.cwd, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        return self

    def _answers(self) -> bool:
        if "Ray runtime started" not in self.log_path.read_text(errors="replace"):
            return False
        if not self.with_dashboard:
            return True
        job_list = [str(VENV_BIN / "ray"), "job", "list", "--address", self.dashboard]
        return subprocess.run(job_list, env=self.env, capture_output=True, text=True).returncode == 0

    def wait_ready(self, timeout: float = 180) -> bool:
        """Whether the head answered within `timeout` seconds (False: it exited or timed out)."""
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(1)
        return True

    def stop(self) -> None:
        """SIGTERM (--block: the head stops every process it started, then exits); the nodes an autoscaler started
        (outside the head's process group) and anything left are killed."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            ours = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            ours = []
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        for p in ours:
            with contextlib.suppress(psutil.Error):
                p.kill()


def kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL to `proc` and every process under it (listed before the first kill, so none escapes by being
    re-parented), even those in sessions of their own (a server's gunicorn); waits for `proc`: its exit code."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()
    code = proc.wait()  # first: reaped by psutil, its exit code would read 0
    psutil.wait_procs(family[1:], timeout=10)
    return code
