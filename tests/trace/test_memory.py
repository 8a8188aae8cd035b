"""The in-memory recorder: the same calls give the slices a Perfetto file re-read from disk gives,
and an engine run recorded in memory holds what the planner's in-run calibration reads."""

from __future__ import annotations

import threading

from moegen.models.loader import load_checkpoint
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.engine import Engine
from moegen.runtime.requests import Request
from moegen.trace.memory import MemoryRecorder
from moegen.trace.recorder import TraceRecorder
from moegen.trace.slices import Label
from moegen.trace.summarize import parse


def record(recorder) -> None:
    """A small trace: two tracks, a flow from a copy to a compute, typed args, a counter, a slice
    recorded while disabled (dropped), and slices from two threads at once."""
    compute, copy = recorder.track("compute stream"), recorder.track("copy H2D weights stream")
    waiting = recorder.counter_track("tokens waiting: experts")
    flow = recorder.new_flow()
    recorder.slice(copy, Label("copy expert[0][1]", {"bytes": 4096}, flows_out=(flow,)), 1_000, 2_000)
    recorder.slice(compute, Label("expert[0][1]", {"tokens": 7, "flops": 1.5e6, "lane": "x", "ok": True},
                                  flows_in=(flow,)), 2_000, 5_000)
    recorder.counter(waiting, 12, ts_ns=3_000)
    recorder.enabled = False
    recorder.slice(compute, Label("dropped"), 6_000, 7_000)
    recorder.enabled = True

    def many(track: int, first: int) -> None:
        for i in range(50):
            recorder.slice(track, Label(f"router[{i}]", {"tokens": i}), first + i, first + i + 1)

    threads = [threading.Thread(target=many, args=(t, base)) for t, base in ((compute, 10_000), (copy, 20_000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorder.close()


def test_memory_recorder_keeps_what_the_trace_file_holds(tmp_path):
    path = tmp_path / "same.pftrace"
    record(TraceRecorder(path))
    memory = MemoryRecorder()
    record(memory)
    key = lambda s: (s.track, s.start, s.name)  # noqa: E731 (threads interleave differently in each)
    from_file = sorted(parse(path).slices, key=key)
    assert sorted(memory.slices, key=key) == from_file
    assert len(from_file) == 2 + 100 and not any(s.name == "dropped" for s in from_file)
    assert dict(memory.counters) == {"tokens waiting: experts": [(3_000, 12.0)]}


def test_an_engine_run_recorded_in_memory(tiny_checkpoint):
    cfg, weights, _ = load_checkpoint(tiny_checkpoint("mixtral"))
    recorder = MemoryRecorder(steps=range(1, 3))
    with Engine(cfg, weights, RuntimeConfig(device="cpu", max_seq_len=32), (), trace=recorder) as engine:
        list(engine.generate([Request([1, 5, 9], 5, ignore_eos=True), Request([1, 7], 5, ignore_eos=True)]))
    steps = [s for s in recorder.slices if s.track == "event loop"]
    assert engine.stats.steps == 5 and [s.args["step"] for s in steps] == [1, 2]  # only --trace-steps 1:3
    inside = lambda s: any(a.start <= s.start <= a.end for a in steps)  # noqa: E731
    compute = [s for s in recorder.slices if s.track.startswith("compute stream")]
    assert compute and all(inside(s) for s in compute)
    # one attention launch per layer per step, each with the token count the calibration reads
    attention = [s for s in compute if s.name.startswith("attention")]
    assert len(attention) == 2 * cfg.num_layers and all(s.args["tokens"] == 2 for s in attention)
    assert len(recorder.counters["generated tokens"]) == 2
