"""A headless Chromium driven over the Chrome DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages,
NUL-terminated, on file descriptors 3 and 4), so the browser tests need no WebDriver and no port.

    with Chromium() as browser:
        value = browser.evaluate(url, "document.title")   # a JS expression; a Promise is awaited
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any


def chromium_path() -> str:
    """The Chromium binary (scripts/ensure_chromium.sh installs Debian's `chromium` when none is on PATH)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no Chromium on PATH: run scripts/ensure_chromium.sh (as root)")


class Chromium:
    def __init__(self, timeout: float = 60.0):
        self.timeout = timeout
        self._id = 0

    def __enter__(self) -> Chromium:
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def child_fds():  # the protocol's fixed descriptors: the browser reads 3 and writes 4
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self._proc = subprocess.Popen(
            [
                chromium_path(),
                "--headless",
                "--remote-debugging-pipe",
                "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
                "--disable-gpu",
                "--no-first-run",
                "--mute-audio",
                "--autoplay-policy=no-user-gesture-required",
                f"--user-data-dir={self._profile.name}",
                "about:blank",
            ],
            preexec_fn=child_fds,
            pass_fds=(3, 4),  # kept open after preexec_fn (subprocess closes the rest after it)
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buf = b""
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._profile.cleanup()

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """One protocol command; returns its result (raises on a protocol error or after `timeout`)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer within {self.timeout} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self._proc.poll()})")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def evaluate(self, url: str, expression: str) -> Any:
        """Open `url` in a new tab, wait for its load, evaluate `expression` there (awaiting a Promise), and
        return the value (JSON)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        wait_load = "new Promise(r => document.readyState === 'complete' ? r(1) : addEventListener('load', () => r(1)))"
        for _ in range(2):  # the first evaluation may land on about:blank before the navigation commits
            self.send("Runtime.evaluate", {"expression": wait_load, "awaitPromise": True}, session=session)
            href = self.send("Runtime.evaluate", {"expression": "location.href", "returnByValue": True}, session)
            if href["result"].get("value") == url:
                break
            time.sleep(0.5)
        out = self.send(
            "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}, session=session
        )
        if "exceptionDetails" in out:
            raise RuntimeError(f"JS error: {out['exceptionDetails']}")
        return out["result"].get("value")
