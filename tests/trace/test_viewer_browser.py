"""A real browser opens `moegen trace view`: headless Chromium loads the bundled Perfetto UI, the UI
loads the trace from /localtrace, and SQL through the UI's own trace processor finds the compute
and copy slices, the flows and the counters — counted independently from the file's protos.

Skipped only when no Chromium is installed (`.ci/run` installs Debian's `chromium`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent

from tools.browser import CHROMIUM, Browser, open_trace

EXAMPLE = Path(__file__).resolve().parents[2] / "traces" / "example-offload.pftrace"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")


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
        open_trace(browser, url)
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
