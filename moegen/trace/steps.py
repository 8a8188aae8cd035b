"""The event loop's side of a trace: step slices and the run's counters."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from moegen.runtime.backend import Backend
from moegen.runtime.scheduler import StepPlan
from moegen.trace.slices import Label

if TYPE_CHECKING:
    from moegen.trace.memory import MemoryRecorder


class StepTracer:
    """The loop's side of a trace: a track for the event loop (step slices), then the streams', then
    counters; `--trace-steps A:B` records only those steps.

    `trace` is a file to write (a Perfetto `TraceRecorder`, recording `steps`) or a recorder already
    made, such as a `MemoryRecorder` (which brings its own `steps`)."""

    def __init__(self, trace: Path | MemoryRecorder, steps: range | None, backend: Backend):
        if isinstance(trace, (str, Path)):
            from moegen.trace.recorder import TraceRecorder  # the perfetto package: only for trace files

            trace = TraceRecorder(Path(trace), steps)
        self.recorder = trace
        self.backend = backend
        self.loop_track = self.recorder.track("event loop")
        backend.trace_to(self.recorder)
        self.counters = {name: self.recorder.counter_track(name, unit) for name, unit in (
            ("sequences in flight", None), ("sequences waiting", None), ("tokens in step", None),
            ("generated tokens", None), ("device memory in use", "bytes"), ("host memory: weights + KV", "bytes"),
            ("KV blocks held", None))}

    def begin_step(self, index: int) -> int:
        self.recorder.enabled = self.recorder.steps is None or index in self.recorder.steps
        return time.time_ns()

    def end_step(self, plan: StepPlan, began: int, generated: int, waiting: int, host_bytes: int,
                 kv_blocks_held: int = 0) -> None:
        self.backend.write_timings()
        prefill = sum(q for q in plan.q_lens if q > 1)
        phase = "prefill" if prefill == plan.num_tokens else "decode" if prefill == 0 else "prefill+decode"
        self.recorder.slice(self.loop_track, Label(f"step {plan.index} ({phase})", {
            "step": plan.index, "phase": phase, "sequences": len(plan.seqs), "prefill_tokens": prefill,
            "decode_tokens": plan.num_tokens - prefill}), began, time.time_ns())
        for name, value in (("sequences in flight", len(plan.seqs)), ("sequences waiting", waiting),
                            ("tokens in step", plan.num_tokens), ("generated tokens", generated),
                            ("device memory in use", self.backend.counters.device_bytes),
                            ("host memory: weights + KV", host_bytes), ("KV blocks held", kv_blocks_held)):
            self.recorder.counter(self.counters[name], value)

    def record_plan(self, plan: dict) -> None:
        """The plan in effect, as one slice on a "plan" track at the run's start: its knobs, and its
        predicted step times and compute seconds per module type (`trace summarize` compares them)."""
        pred = plan["predicted"]
        args = {f"knob {k}": ("auto" if v is None else v) for k, v in plan["knobs"].items()}
        args |= {"decode_step_s": pred["decode_step_s"], "prefill_step_s": pred["prefill_step_s"],
                 "prefill_tok_s": pred["prefill_tok_s"], "decode_tok_s": pred["decode_tok_s"],
                 "decode_sequences": plan["placement"]["decode_sequences"]}
        args |= {f"decode {kind}_s": s for kind, s in pred["decode_modules"].items()}
        now = time.time_ns()
        was, self.recorder.enabled = self.recorder.enabled, True
        self.recorder.slice(self.recorder.track("plan"), Label("plan", args), now, now + 1000)
        self.recorder.enabled = was

    def close(self) -> None:
        self.recorder.close()
