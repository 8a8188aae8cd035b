"""Perfetto traces: the written file re-read with the perfetto protos, and `summarize` checked on a
synthetic trace written here, independently of moegen's recorder, with hand-computed answers."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent

from moegen.cli import main
from moegen.models.hf_config import generation_eos_ids
from moegen.models.loader import load_checkpoint
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.engine import Engine
from moegen.runtime.requests import Request
from moegen.trace.summarize import TraceFileError, format_summary, summarize

PROMPTS = [[1, 5, 9, 12], [1] + list(range(300, 320)), [1, 42], [1, 7, 7, 100]]


def traced_run(path, out, steps=None, **knobs):
    cfg, weights, _ = load_checkpoint(path)
    rcfg = RuntimeConfig(max_seq_len=64, **knobs)
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg), trace=out, trace_steps=steps) as engine:
        list(engine.generate([Request(p, 6) for p in PROMPTS]))
        return engine


def read(path):
    """Tracks by uuid, and per track the events in file order, straight from the protos."""
    trace = Trace.FromString(path.read_bytes())
    tracks, names, events = {}, {}, []
    for packet in trace.packet:
        if packet.HasField("track_descriptor"):
            tracks[packet.track_descriptor.uuid] = packet.track_descriptor
        for entry in packet.interned_data.event_names:
            names[entry.iid] = entry.name
        if packet.HasField("track_event"):
            events.append((packet.timestamp, packet.track_event))
    return tracks, names, events


@pytest.fixture(scope="module")
def mixtral(tiny_checkpoint):
    return tiny_checkpoint("mixtral")


def test_trace_file_structure(mixtral, tmp_path):
    out = tmp_path / "run.pftrace"
    # A device budget, so the KV is staged (on an unbudgeted cpu backend attention reads it in place).
    traced_run(mixtral, out, batch_size=2, attn_micro_batch=1, expert_slots=2, gpu_memory=2**40)
    tracks, names, events = read(out)
    ordered = sorted((t for t in tracks.values() if t.parent_uuid), key=lambda t: t.sibling_order_rank)
    order = [t.name for t in ordered]
    assert order[:4] == ["event loop", "compute stream", "compute stream lane 1", "compute stream lane 2"]
    assert {n for n in order[4:7]} == {"copy H2D weights stream", "copy H2D KV stream", "copy D2H stream"}

    stacks, begun, ended, counters, slice_names = {}, {}, {}, {}, []
    for ts, e in events:
        name = tracks[e.track_uuid].name
        if e.type == TrackEvent.TYPE_SLICE_BEGIN:
            stacks.setdefault(name, []).append(ts)
            begun.update({f: ts for f in e.flow_ids})
            ended.update({f: ts for f in e.terminating_flow_ids})
            slice_names.append((name, names[e.name_iid]))
        elif e.type == TrackEvent.TYPE_SLICE_END:
            start = stacks[name].pop()  # every end closes an open slice on its own track
            assert start <= ts
        elif e.type == TrackEvent.TYPE_COUNTER:
            counters.setdefault(name, []).append(e.double_counter_value)
    assert all(not open_ for open_ in stacks.values())  # well nested: nothing left open
    assert begun and set(begun) == set(ended)  # each flow (weight copy -> its compute, KV staging -> attention) has both ends
    assert all(begun[f] <= ended[f] for f in begun)  # and runs forward in time (viewers drop the others)
    kinds = {n.split("[")[0] for track, n in slice_names if "compute" in track}
    assert {"attention", "router", "expert", "combine", "lm_head + sample"} <= kinds
    # the embedding lookup runs on the host (the table is not the lm_head's): its rows cross the KV stream,
    # after the step's inputs, and the host worker that gathered them has a track of its own
    assert {"copy step inputs", "copy embeddings"} <= {n for track, n in slice_names if "H2D KV" in track}
    assert any(track == "host KV gather stream" for track, _ in slice_names)
    assert any(n.startswith("copy expert[") for track, n in slice_names if "H2D weights" in track)
    assert any(n.startswith("stage KV[") for track, n in slice_names if "H2D KV" in track)
    for name in ("sequences in flight", "generated tokens", "device memory in use", "host memory: weights + KV",
                 "tokens waiting: attention", "tokens waiting: router", "tokens waiting: experts"):
        assert counters.get(name), name
    for kind in ("attention", "router", "experts"):  # every queued token was taken: each ends at zero, never below
        values = counters[f"tokens waiting: {kind}"]
        assert values[-1] == 0 and min(values) >= 0, (kind, values[-5:])
    assert counters["generated tokens"][-1] == len(PROMPTS) * 6
    assert max(counters["KV blocks held"]) > 0  # sequences hold blocks while they run


def test_trace_steps_records_only_those_steps(mixtral, tmp_path):
    out = tmp_path / "steps.pftrace"
    traced_run(mixtral, out, batch_size=4, steps=range(2, 4))
    tracks, names, events = read(out)
    steps = sorted(names[e.name_iid] for _, e in events
                   if e.type == TrackEvent.TYPE_SLICE_BEGIN and tracks[e.track_uuid].name == "event loop")
    assert [s.split()[1] for s in steps] == ["2", "3"]


def test_no_trace_no_recorder(mixtral, tmp_path):
    cfg, weights, _ = load_checkpoint(mixtral)
    with Engine(cfg, weights, RuntimeConfig(max_seq_len=64), (2,)) as engine:
        list(engine.generate([Request(PROMPTS[0], 2)]))
        assert engine.trace is None and engine.backend.recorder is None


# -- summarize, on a trace written here by hand -------------------------------------------------


def hand_trace(tracks: list[str]):
    """(trace, sl): an empty trace with these tracks, and sl(track, name, start_ms, end_ms, **args) to add
    a slice (int, float and str args)."""
    trace = Trace()
    uuid = {name: i + 1 for i, name in enumerate(tracks)}
    for name, u in uuid.items():
        p = trace.packet.add()
        p.track_descriptor.uuid, p.track_descriptor.name = u, name
    ms = 1_000_000

    def sl(track, name, start, end, **args):
        b = trace.packet.add()
        b.timestamp = start * ms
        b.track_event.type, b.track_event.track_uuid, b.track_event.name = TrackEvent.TYPE_SLICE_BEGIN, uuid[track], name
        for k, v in args.items():
            a = b.track_event.debug_annotations.add()
            a.name = k
            setattr(a, {int: "int_value", float: "double_value", str: "string_value"}[type(v)], v)
        e = trace.packet.add()
        e.timestamp = end * ms
        e.track_event.type, e.track_event.track_uuid = TrackEvent.TYPE_SLICE_END, uuid[track]

    return trace, sl


def synthetic(path):
    """Known layout (ms): step [0, 40); compute [0,10) and [20,30); H2D weights copy [5,25) of 2e6 bytes;
    D2H copy [30,32). Two compute slices of 1e9 FLOPs each."""
    trace, sl = hand_trace(["event loop", "compute stream", "copy H2D weights stream", "copy D2H stream"])
    sl("event loop", "step 0", 0, 40)
    sl("compute stream", "expert[0][0]", 0, 10, flops=10**9, tokens=5)
    sl("copy H2D weights stream", "copy expert[0][1]", 5, 25, bytes=2 * 10**6)
    sl("compute stream", "attention[1]", 20, 30, flops=10**9, tokens=5)
    sl("copy D2H stream", "write back KV[0]", 30, 32, bytes=1000)
    path.write_bytes(trace.SerializeToString())


def test_summarize_numbers_by_hand(tmp_path):
    path = tmp_path / "synthetic.pftrace"
    synthetic(path)
    s = summarize(path)
    assert s["wall_s"] == pytest.approx(0.040)
    assert s["streams"]["compute stream"] == pytest.approx(20 / 40)
    assert s["streams"]["copy H2D weights stream"] == pytest.approx(20 / 40)
    assert s["streams"]["copy D2H stream"] == pytest.approx(2 / 40)
    # both busy: [5,10) + [20,25) = 10 ms; either busy: [0, 32) = 32 ms
    assert s["overlap"] == pytest.approx(10 / 32)
    assert s["bubbles"]["total_s"] == pytest.approx(0.010) and s["bubbles"]["count"] == 1
    assert s["bubbles"]["largest"][0]["before"] == "attention[1]"
    assert s["link_gbps"] == pytest.approx(2e6 / 0.020 / 1e9)  # H2D bytes over H2D busy time
    assert s["flops"] == pytest.approx(2e9 / 0.020)
    assert s["modules"]["expert"]["s"] == pytest.approx(0.010) and s["modules"]["attention"]["launches"] == 1
    assert s["bound"] == "compute"  # compute and link both 50% busy: not link-bound
    assert s["experts"] == {"expert[0][0]": {"s": pytest.approx(0.010), "tokens": 5, "launches": 1}}
    assert set(s) == {"wall_s", "streams", "overlap", "bubbles", "modules", "experts", "link_gbps", "flops", "bound",
                      "plan"}
    assert s["plan"] is None  # no plan was recorded


def test_summarize_shares_a_grouped_launch_among_its_experts_by_tokens(tmp_path):
    """By hand (ms): a group of experts 3 (30 tokens) and 5 (10 tokens) of layer 1 over [0, 8), and expert[1][5]
    alone over [8, 10): expert 3 took 6 ms, expert 5 2 + 2 = 4 ms in two launches."""
    trace, sl = hand_trace(["event loop", "compute stream"])
    sl("event loop", "step 0", 0, 10)
    sl("compute stream", "expert[1] group", 0, 8, layer=1, tokens=40, experts="3:30 5:10")
    sl("compute stream", "expert[1][5]", 8, 10, layer=1, tokens=4)
    path = tmp_path / "grouped.pftrace"
    path.write_bytes(trace.SerializeToString())
    s = summarize(path)
    assert s["experts"] == {"expert[1][3]": {"s": pytest.approx(0.006), "tokens": 30, "launches": 1},
                            "expert[1][5]": {"s": pytest.approx(0.004), "tokens": 14, "launches": 2}}
    assert s["modules"]["expert"]["launches"] == 2 and s["modules"]["expert"]["s"] == pytest.approx(0.010)
    assert "expert[1][3]" in format_summary(s)


def test_summarize_counts_a_streams_lanes_as_the_stream(tmp_path):
    """By hand (ms): step [0, 40); the compute stream runs a router [0, 5) and a combine [20, 22); its
    lanes run experts side by side: lane 1 [5, 15) and [15, 19), lane 2 [6, 20). The stream is busy
    [0, 22) (not 22 + the lanes' 28 ms), experts took [5, 20) = 15 ms, and nothing idled inside."""
    trace, sl = hand_trace(["event loop", "compute stream", "compute stream lane 1", "compute stream lane 2"])
    sl("event loop", "step 0", 0, 40)
    sl("compute stream", "router[0]", 0, 5, tokens=8)
    sl("compute stream lane 1", "expert[0][0]", 5, 15, tokens=4, flops=10**9)
    sl("compute stream lane 1", "expert[0][2]", 15, 19, tokens=2, flops=10**9)
    sl("compute stream lane 2", "expert[0][1]", 6, 20, tokens=6, flops=10**9)
    sl("compute stream", "combine[0]", 20, 22, tokens=8)
    path = tmp_path / "lanes.pftrace"
    path.write_bytes(trace.SerializeToString())
    s = summarize(path)
    assert s["streams"] == {"compute stream": pytest.approx(22 / 40)}
    assert s["modules"]["expert"]["s"] == pytest.approx(0.015) and s["modules"]["expert"]["launches"] == 3
    assert s["modules"]["expert"]["share_of_wall"] == pytest.approx(15 / 40)
    assert s["bubbles"]["total_s"] == 0
    assert s["flops"] == pytest.approx(3e9 / 0.022)


def test_summarize_sets_a_run_against_its_plan(tmp_path):
    """A hand-made trace with a plan slice: the full decode steps (4 sequences) are 20 ms each and
    hold 6 + 4 ms of expert and 4 ms of attention compute; a 2-sequence decode step and its attention
    are not full steps; the prefill step runs 20 prompt tokens in 10 ms."""
    trace, sl = hand_trace(["plan", "event loop", "compute stream"])
    sl("plan", "plan", 0, 0, decode_sequences=4, decode_step_s=0.025, decode_tok_s=160.0, prefill_tok_s=1000.0,
       prefill_step_s=0.02, **{"decode expert_s": 0.004, "decode attention_s": 0.004})
    sl("event loop", "step 0 (prefill)", 0, 10, phase="prefill", sequences=4, prefill_tokens=20)
    sl("event loop", "step 1 (decode)", 10, 30, phase="decode", sequences=4)
    sl("event loop", "step 2 (decode)", 30, 50, phase="decode", sequences=4)
    sl("event loop", "step 3 (decode)", 50, 60, phase="decode", sequences=2)
    sl("compute stream", "expert[0][0]", 10, 16, tokens=4)
    sl("compute stream", "attention[0]", 16, 20, tokens=4)
    sl("compute stream", "expert[0][1]", 30, 34, tokens=4)
    sl("compute stream", "attention[0]", 50, 55, tokens=2)
    path = tmp_path / "planned.pftrace"
    path.write_bytes(trace.SerializeToString())
    v = summarize(path)["plan"]
    assert v["decode_steps"] == 2 and v["prefill_steps"] == 1
    assert v["decode_step_s"] == {"predicted": 0.025, "measured": pytest.approx(0.020)}
    assert v["decode_tok_s"] == {"predicted": 160.0, "measured": pytest.approx(4 / 0.020)}
    assert v["prefill_tok_s"] == {"predicted": 1000.0, "measured": pytest.approx(20 / 0.010)}
    assert v["modules"]["expert"] == {"predicted": 0.004, "measured": pytest.approx((0.006 + 0.004) / 2)}
    assert v["modules"]["attention"] == {"predicted": 0.004, "measured": pytest.approx(0.004 / 2)}
    text = format_summary(summarize(path))
    assert "against the plan (2 full decode steps, 1 prefill steps)" in text
    assert re.search(r"expert per decode step\s+predicted\s+4\.00 ms\s+measured\s+5\.00 ms\s+\(1\.25x\)", text), text


def test_summarize_names_host_attention_as_the_plan_does(tmp_path):
    """By hand (ms), one full decode step [0, 20): on the device attention[0] [0, 3), the host-attended share's
    projections [3, 5) and output projection [10, 11); on the host worker its attention [5, 10). The device's
    parts are attention (the planner counts them there: 6 ms), the worker's host attention (5 ms)."""
    trace, sl = hand_trace(["plan", "event loop", "compute stream", "host attention stream"])
    sl("plan", "plan", 0, 0, decode_sequences=4, decode_step_s=0.02, decode_tok_s=200.0, prefill_tok_s=1.0,
       prefill_step_s=0.02, **{"decode attention_s": 0.006, "decode host attention_s": 0.004})
    sl("event loop", "step 0 (decode)", 0, 20, phase="decode", sequences=4)
    sl("compute stream", "attention[0]", 0, 3, tokens=2)
    sl("compute stream", "project for host attention[0]", 3, 5, tokens=2)
    sl("host attention stream", "host attention[0]", 5, 10, tokens=2)
    sl("compute stream", "output of host attention[0]", 10, 11, tokens=2)
    path = tmp_path / "host.pftrace"
    path.write_bytes(trace.SerializeToString())
    s = summarize(path)
    assert set(s["modules"]) == {"attention", "host attention"}
    assert s["modules"]["attention"]["s"] == pytest.approx(0.006) and s["modules"]["attention"]["launches"] == 3
    assert s["modules"]["host attention"]["s"] == pytest.approx(0.005)
    v = s["plan"]["modules"]
    assert v["attention"]["measured"] == pytest.approx(0.006) and v["host attention"]["measured"] == pytest.approx(0.005)


def test_summarize_cli_json_and_errors(tmp_path):
    path = tmp_path / "synthetic.pftrace"
    synthetic(path)
    result = CliRunner().invoke(main, ["trace", "summarize", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["overlap"] == pytest.approx(10 / 32)
    empty, junk = tmp_path / "empty.pftrace", tmp_path / "junk.pftrace"
    empty.write_bytes(b"")
    junk.write_bytes(b"\xff\xfe not a trace \x00\x01")
    for bad, words in ((empty, "empty"), (junk, "not a Perfetto"), (tmp_path / "missing.pftrace", "can't read")):
        result = CliRunner().invoke(main, ["trace", "summarize", str(bad)])
        assert result.exit_code == 1 and words in result.stderr, result.output
    with pytest.raises(TraceFileError):
        summarize(empty)


def test_serve_offline_trace_end_to_end(mixtral, tmp_path):
    dataset = tmp_path / "rows.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"Row {i} says hello"}) + "\n" for i in range(6)))
    trace = tmp_path / "serve.pftrace"
    result = CliRunner().invoke(main, ["serve-offline", str(mixtral), "--dataset", str(dataset), "--output",
                                       str(tmp_path / "out.jsonl"), "--max-new-tokens", "4", "--trace", str(trace),
                                       "--expert-slots", "1"])
    assert result.exit_code == 0, result.output
    s = summarize(trace)
    assert s["streams"]["compute stream"] > 0 and s["streams"]["copy H2D weights stream"] > 0
    assert s["modules"]["expert"]["tokens"] > 0 and s["link_gbps"] > 0


def test_trace_view_serves_the_ui_and_the_trace(tmp_path):
    """The endpoints the bundled Perfetto UI calls; the in-browser check is not built yet."""
    import urllib.request

    from moegen.trace.view import serve_in_thread, web_dist

    path = tmp_path / "synthetic.pftrace"
    synthetic(path)
    server, url = serve_in_thread(path)
    try:
        def get(p):
            with urllib.request.urlopen(url + p, timeout=10) as r:
                return r.status, r.read()

        assert get("vizviewer_info") == (200, b"{}")
        status, body = get("localtrace")
        assert status == 200 and body == path.read_bytes()
        status, index = get("index.html")
        assert status == 200 and index == (web_dist() / "index.html").read_bytes()
    finally:
        server.shutdown()
        server.server_close()


class FakeTimingEvent:
    """What write_finished reads of a torch.cuda.Event(enable_timing=True): done or not, and the
    device milliseconds between two events."""

    def __init__(self, device_ms: float, done: bool = True):
        self.device_ms, self.done = device_ms, done

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, other) -> float:
        return other.device_ms - self.device_ms


def test_cuda_device_timings_land_on_the_host_clock(tmp_path):
    """The cuda backend's slices: device event times, shifted by the anchor taken when tracing
    began, in host nanoseconds; work still running on the device stays pending, in order."""
    from moegen.runtime.cuda_backend import DeviceClock, TimedWork, write_finished
    from moegen.trace.recorder import Label, TraceRecorder
    from moegen.trace.summarize import parse

    recorder = TraceRecorder(tmp_path / "cuda.pftrace")
    track = recorder.track("compute stream")
    anchor_host_ns = 1_700_000_000_000_000_000
    clock = DeviceClock(FakeTimingEvent(500.0), anchor_host_ns)  # device clock read 500 ms at the anchor
    pending = [TimedWork(track, Label("expert[0][1]", {"tokens": 7}), FakeTimingEvent(501.0), FakeTimingEvent(503.5)),
               TimedWork(track, Label("expert[0][2]"), FakeTimingEvent(503.5), FakeTimingEvent(510.0, done=False))]
    left = write_finished(pending, clock, recorder)
    assert [w.label.name for w in left] == ["expert[0][2]"]
    left[0].end.done = True
    assert write_finished(left, clock, recorder) == []
    recorder.close()
    slices = {s.name: s for s in parse(tmp_path / "cuda.pftrace").slices}
    assert (slices["expert[0][1]"].start, slices["expert[0][1]"].end) == (anchor_host_ns + 1_000_000,
                                                                          anchor_host_ns + 3_500_000)
    assert (slices["expert[0][2]"].start, slices["expert[0][2]"].end) == (anchor_host_ns + 3_500_000,
                                                                          anchor_host_ns + 10_000_000)
    assert slices["expert[0][1]"].args["tokens"] == 7
