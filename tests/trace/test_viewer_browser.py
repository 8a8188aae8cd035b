"""A real browser opens `moegen trace view`: headless Chromium loads the bundled Perfetto UI, the UI
loads the trace from /localtrace, and SQL through the UI's own trace processor finds the compute
and copy slices, the flows and the counters — counted independently from the file's protos.

Skipped only when no Chromium is installed (`.ci/run` installs Debian's `chromium`)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("chromium-headless-shell")
EXAMPLE = Path(__file__).resolve().parents[2] / "traces" / "example-offload.pftrace"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proto_counts(path: Path) -> dict:
    trace = Trace.FromString(path.read_bytes())
    names, counts = {}, {"compute": 0, "copy": 0, "flows": 0, "counters": 0}
    for p in trace.packet:
        if p.HasField("track_descriptor"):
            names[p.track_descriptor.uuid] = p.track_descriptor.name
        if p.HasField("track_event"):
            e = p.track_event
            if e.type == TrackEvent.TYPE_SLICE_BEGIN:
                track = names[e.track_uuid]
                counts["compute"] += "compute" in track
                counts["copy"] += "copy" in track
                counts["flows"] += len(e.terminating_flow_ids)
            elif e.type == TrackEvent.TYPE_COUNTER:
                counts["counters"] += 1
    return counts


class Browser:
    """Headless Chromium driven over the DevTools protocol."""

    def __init__(self, user_data: Path):
        import websocket

        port = free_port()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={user_data}", f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2))
                break
            except OSError:
                assert time.monotonic() < deadline, "Chromium's DevTools endpoint never came up"
                time.sleep(0.2)
        page = next(t for t in tabs if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        self.n = 0

    def call(self, method: str, **params) -> dict:
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                return msg

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        return result["result"]["result"].get("value")

    def close(self) -> None:
        self.ws.close()
        self.proc.kill()
        self.proc.wait()


QUERIES = {
    "compute": "select count(*) as n from slice join track on slice.track_id = track.id where track.name like '%compute%'",
    "copy": "select count(*) as n from slice join track on slice.track_id = track.id where track.name like '%copy%'",
    "flows": "select count(*) as n from flow",
    "counters": "select count(*) as n from counter",
}


def test_the_ui_loads_the_trace_and_its_sql_finds_slices_flows_and_counters(tmp_path):
    from moegen.trace.view import serve_in_thread

    server, url = serve_in_thread(EXAMPLE)
    browser = Browser(tmp_path / "chromium")
    try:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=url)
        deadline = time.monotonic() + 60
        while not browser.evaluate("!!(window.app && app.trace && app.trace.engine)"):
            assert time.monotonic() < deadline, "the Perfetto UI never finished loading /localtrace"
            time.sleep(0.5)
        js = "(async () => ({%s}))()" % ", ".join(
            f"{key}: (await app.trace.engine.query({json.dumps(sql)})).firstRow({{n: 0}}).n"
            for key, sql in QUERIES.items())
        found = browser.evaluate(js)
    finally:
        browser.close()
        server.shutdown()
        server.server_close()
    want = proto_counts(EXAMPLE)
    assert found == want, (found, want)
    assert all(v > 0 for v in want.values())
