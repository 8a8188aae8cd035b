"""Stage 4, parts 2 and 3 (offload.module, offload.model): one batching mode's run on the
Mixtral-shaped checkpoint, each in its own process (its own peak host memory and device memory).

Both run the plan the write part chose (bfloat16, --gpu-memory, B prompts of `prompt` tokens each
generating `decode`, every prompt admitted in the first admission_steps steps): module-based
batching runs B; model-based batching fits what its device KV allows (its B is reported). The module
run also writes the check's one trace, of `--trace-steps` full-batch decode steps.

Numbers come from every step, seen through the engine's step hooks (StepWindow): wall seconds and
the backend's link counters around each. The decode numbers are over the pure-decode steps at full
batch. The link bound is B × link GB/s / bytes moved per such step (h2d + d2h: weights and KV);
the weights-only bound divides by h2d_weight_bytes alone.

Record: `mode`, `batch`, `requested_batch`, `kv_bound` (model: B < requested), `decode_steps`,
`decode_tok_s`, `bytes_per_step` {h2d, d2h, h2d_weight}, `link_gbps`, `link_bound_tok_s`,
`weights_bound_tok_s`, `of_bound` (decode_tok_s / link bound), `load_s`, `run_s`, `peak_host_bytes`
(VmHWM), `max_memory_reserved`, `max_memory_allocated`, `device_high_water`, `gpu_memory`,
`knobs` (what placement chose), `trace` (module: the file).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tools.gpu_check import host
from tools.gpu_check.mixtral_shaped import COMPLETE, paths
from tools.gpu_check.options import CheckOptions
from tools.gpu_check.sizing import OffloadPlan
from tools.gpu_check.stages import Outcome, Skip

TRACE = "module.pftrace"


@dataclass(slots=True)
class StepSample:
    index: int
    decode: bool  # every sequence of the step decodes one token (no prompt admitted)
    sequences: int
    seconds: float  # wall, from the step's start to its sampled ids on the host
    h2d: int  # bytes submitted during the step
    d2h: int
    h2d_weight: int


@dataclass(slots=True)
class StepWindow:
    """Stands in the engine's tracer seat (begin_step/end_step around every step), passing calls on
    to the real tracer if any, and keeps a StepSample per step."""

    inner: object | None  # the engine's StepTracer, or None
    counters: object  # the backend's Counters
    samples: list[StepSample] = field(default_factory=list)
    _began: tuple = ()

    def begin_step(self, index: int) -> int:
        c = self.counters
        self._began = (time.perf_counter(), c.h2d_bytes, c.d2h_bytes, c.h2d_weight_bytes)
        return self.inner.begin_step(index) if self.inner is not None else time.time_ns()

    def end_step(self, plan, began: int, generated: int, waiting: int, host_bytes: int, kv_blocks_held: int = 0) -> None:
        t0, h2d, d2h, weight = self._began
        c = self.counters
        self.samples.append(StepSample(plan.index, all(q == 1 for q in plan.q_lens), len(plan.seqs),
                                       time.perf_counter() - t0, c.h2d_bytes - h2d, c.d2h_bytes - d2h,
                                       c.h2d_weight_bytes - weight))
        if self.inner is not None:
            self.inner.end_step(plan, began, generated, waiting, host_bytes, kv_blocks_held)

    def record_plan(self, plan: dict) -> None:
        if self.inner is not None:
            self.inner.record_plan(plan)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()

    def full_decode(self) -> list[StepSample]:
        """The pure-decode steps at the largest batch any decode step had."""
        decode = [s for s in self.samples if s.decode]
        full = max((s.sequences for s in decode), default=0)
        return [s for s in decode if s.sequences == full]


def run(opts: CheckOptions, name: str) -> Outcome:
    mode = name.split(".", 1)[1]
    model_dir, plan_file = paths(opts)
    if not (model_dir / COMPLETE).is_file() or not plan_file.is_file():
        raise Skip(f"no complete checkpoint and plan in {model_dir.parent}: offload.write did not finish")
    plan = OffloadPlan.load(plan_file)
    from moegen.models.hf_config import generation_eos_ids
    from moegen.models.loader import load_checkpoint
    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request

    started = time.perf_counter()
    cfg, weights, _ = load_checkpoint(model_dir, torch.bfloat16)
    rcfg = RuntimeConfig(device=opts.device, dtype=opts.dtype, batch_size=plan.batch, gpu_memory=plan.gpu_memory,
                         max_seq_len=plan.prompt + plan.decode, max_step_tokens=plan.max_step_tokens, batching=mode,
                         sim_link_gbps=plan.link_gbps if opts.device == "cpu" else None)
    trace = opts.work / "offload" / TRACE if mode == "module" else None
    if trace is not None:
        trace.unlink(missing_ok=True)
    first = plan.admission_steps + 1  # the first steps at full batch, all decode
    with Engine(cfg, weights, rcfg, generation_eos_ids(model_dir, cfg), trace=trace,
                trace_steps=range(first, first + opts.trace_steps)) as engine:
        window = engine.trace = StepWindow(engine.trace, engine.backend.counters)
        load_s = time.perf_counter() - started
        B = engine.runtime.batch_size
        prompts = [[1] + [(7 * i + 13 * j) % 509 + 3 for j in range(plan.prompt - 1)] for i in range(B)]
        run_started = time.perf_counter()
        for _ in engine.generate([Request(p, plan.decode, ignore_eos=True) for p in prompts]):
            pass
        run_s = time.perf_counter() - run_started
        placement = engine.runtime.placement
        knobs = {"expert_slots": placement.pools["expert"].count if "expert" in placement.pools else 0,
                 "resident_modules": len(placement.resident_modules),
                 "resident_experts": sum(m.kind == "expert" for m in placement.resident_modules),
                 "streamed_bytes": sum(b.nbytes for m, b in placement.blocks.items() if placement.streamed(m))}
        high_water = engine.backend.counters.device_high_water
        host_buffers = engine.runtime.host_bytes  # the weight arena + the host KV cache
    numbers = _decode_numbers(window, plan.link_gbps) | {
        "mode": mode, "batch": B, "requested_batch": plan.batch, "kv_bound": B < plan.batch, "load_s": load_s,
        "run_s": run_s, "peak_host_bytes": host.peak_rss(), "host_buffer_bytes": host_buffers,
        "host_bound_bytes": int(1.05 * host_buffers + 2 * 2**30), "device_high_water": high_water,
        "gpu_memory": plan.gpu_memory, "knobs": knobs, "steps": len(window.samples),
        "trace": str(trace) if trace is not None else None}
    failure = None
    if opts.device == "cuda" and numbers["peak_host_bytes"] > numbers["host_bound_bytes"]:
        failure = (f"peak host memory {numbers['peak_host_bytes'] / 2**30:.2f} GiB exceeds 1.05 x (weights + KV "
                   f"{host_buffers / 2**30:.2f} GiB) + 2 GiB")
    if opts.device == "cuda":
        reserved = torch.cuda.max_memory_reserved()
        numbers |= {"max_memory_reserved": reserved, "max_memory_allocated": torch.cuda.max_memory_allocated()}
        if reserved > plan.gpu_memory:
            failure = failure or (f"torch.cuda.max_memory_reserved() {reserved / 2**30:.2f} GiB exceeds "
                                  f"--gpu-memory {plan.gpu_memory / 2**30:.2f} GiB: the runtime's budget does not "
                                  "hold what torch allocates")
    bound = (f" = {100 * numbers['of_bound']:.0f}% of the link bound {numbers['link_bound_tok_s']:.1f}"
             if numbers["link_bound_tok_s"] else " (nothing streamed)")
    numbers["headline"] = (f"B {B}: decode {numbers['decode_tok_s']:.1f} tok/s{bound}; host peak "
                           f"{numbers['peak_host_bytes'] / 2**30:.1f} GiB"
                           + (f", reserved {numbers['max_memory_reserved'] / 2**30:.2f} GiB" if "max_memory_reserved"
                              in numbers else ""))
    return Outcome(numbers, failure)


def _decode_numbers(window: StepWindow, link_gbps: float) -> dict:
    """Tokens/s and bytes moved per step over the full-batch decode steps; bounds are None where
    nothing crossed the link."""
    steps = window.full_decode()
    seconds = sum(s.seconds for s in steps)
    sequences = steps[0].sequences if steps else 0
    n = max(len(steps), 1)
    per_step = {"h2d": sum(s.h2d for s in steps) / n, "d2h": sum(s.d2h for s in steps) / n,
                "h2d_weight": sum(s.h2d_weight for s in steps) / n}
    moved = per_step["h2d"] + per_step["d2h"]
    tok_s = sum(s.sequences for s in steps) / seconds if seconds else 0.0
    bound = sequences * link_gbps * 1e9 / moved if moved else None
    return {"decode_steps": len(steps), "decode_sequences": sequences, "decode_tok_s": tok_s, "decode_s": seconds,
            "bytes_per_step": per_step, "link_gbps": link_gbps, "link_bound_tok_s": bound,
            "of_bound": tok_s / bound if bound else None,
            "weights_bound_tok_s": sequences * link_gbps * 1e9 / per_step["h2d_weight"] if per_step["h2d_weight"]
            else None}
