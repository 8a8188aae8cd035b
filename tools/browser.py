"""Headless Chromium over the DevTools protocol, opening a trace in the bundled Perfetto UI.

Shared by tests/trace/test_viewer_browser.py and tools/trace_screenshots.py. Needs `websocket-client`
(a dev dependency) and a Chromium binary (Debian: `apt-get install chromium`)."""

from __future__ import annotations

import base64
import json
import os
import signal
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "chromium-headless-shell")
INSTALL_HINT = "install chromium: apt-get install chromium"


def find_chromium() -> str | None:
    """The first Chromium binary on PATH, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = find_chromium()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """Headless Chromium driven over the DevTools protocol, one page.

    `viewport=(width, height)` fixes the window and the page's CSS viewport (device scale factor 1), so
    screenshots come out at exactly that size."""

    def __init__(self, user_data: Path, viewport: tuple[int, int] | None = None, chromium: str | None = None):
        import websocket

        chromium = chromium or CHROMIUM
        if chromium is None:
            raise RuntimeError(f"no Chromium found on PATH ({', '.join(CHROMIUM_NAMES)}); {INSTALL_HINT}")
        port = free_port()
        size = [f"--window-size={viewport[0]},{viewport[1]}", "--force-device-scale-factor=1",
                "--hide-scrollbars"] if viewport else []
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             *size, f"--user-data-dir={user_data}", f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2))
                    break
                except OSError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"{chromium} exited with {self.proc.returncode} before its DevTools "
                                           "endpoint came up") from None
                    if time.monotonic() > deadline:
                        raise RuntimeError("Chromium's DevTools endpoint never came up") from None
                    time.sleep(0.2)
            page = next(t for t in tabs if t["type"] == "page")
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        except BaseException:
            self._kill()
            raise
        self.n = 0
        if viewport:
            self.call("Emulation.setDeviceMetricsOverride", width=viewport[0], height=viewport[1],
                      deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"DevTools {method}: {msg['error']}")
                return msg

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited); a thrown exception is raised."""
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)["result"]
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise RuntimeError(f"JavaScript error: {text}\nin: {expression[:500]}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str, interval: float = 0.25) -> None:
        """Poll a JavaScript expression until it is truthy; RuntimeError naming `what` after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} (waited {timeout:.0f}s)")
            time.sleep(interval)

    def screenshot(self, path: Path) -> Path:
        """The page's viewport as a PNG at `path`."""
        data = self.call("Page.captureScreenshot", format="png", fromSurface=True)["result"]["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def _kill(self) -> None:
        """Chromium and its helper processes: the session it was started in."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self._kill()


TRACE_LOADED = "!!(window.app && app.trace && app.trace.engine)"


def open_trace(browser: Browser, url: str, timeout: float = 60) -> None:
    """Navigate to a `moegen trace view` server's URL and wait until the UI has loaded its trace."""
    browser.call("Page.enable")
    browser.call("Page.navigate", url=url)
    browser.wait_for(TRACE_LOADED, timeout, "the Perfetto UI never finished loading /localtrace")
