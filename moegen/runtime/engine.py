"""The engine: a model on a backend, its module tasks on a uvloop event loop, and the step loop.

    engine = Engine.from_model_dir(path, RuntimeConfig(batch_size=64))
    for result in engine.generate([Request(prompt_ids=ids, max_new_tokens=64), ...]):
        print(result.id, result.token_ids, result.finish_reason)

`generate` yields each result as soon as its sequence finishes. The loop runs on a thread of its
own; an exception in any module task cancels the run and is re-raised to the caller as it was.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from moegen.config import ModelConfig
from moegen.models.hf_config import generation_eos_ids
from moegen.models.kv_cache import LayerKV, allocate_kv, kv_bytes_per_token, layer_kv
from moegen.models.loader import load_checkpoint
from moegen.models.rope import Rope
from moegen.models.weights import ModelWeights
from moegen.runtime.backend import Backend, DeviceBudgetError, Event
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.cpu_backend import CpuBackend
from moegen.runtime.placement import Placement, minimum_device_bytes
from moegen.runtime.requests import Request, Result
from moegen.runtime.sampling import SamplingParams
from moegen.runtime.scheduler import Scheduler, StepPlan
from moegen.runtime.step import Routing, Step, micro_batches
from moegen.runtime.tasks import STOP, all_queues, all_tasks

QUEUE_DEPTH = 4096  # bounded; far above what one step puts in flight per queue


@dataclass(slots=True)
class EngineStats:
    """What the engine did, over its life."""

    steps: int = 0
    generated_tokens: int = 0  # sampled so far (live: read by progress lines from another thread)
    tokens_per_step: list[int] = field(default_factory=list)  # prompt + decode tokens of each step
    expert_counts: list[list[int]] = field(default_factory=list)  # tokens per expert, per (step, MoE layer)


@dataclass(slots=True)
class Queues:
    embed: asyncio.Queue
    head: asyncio.Queue
    prefetch: asyncio.Queue
    attn: list[asyncio.Queue]
    router: list[asyncio.Queue]
    combine: list[asyncio.Queue]
    mlp: list[asyncio.Queue | None]
    expert: list[list[asyncio.Queue]]


class Runtime:
    """Everything the module tasks share for one run: model, backend, placement, KV, queues."""

    def __init__(self, cfg: ModelConfig, rcfg: RuntimeConfig, backend: Backend, weights: ModelWeights):
        self.cfg, self.rcfg, self.backend = cfg, rcfg, backend
        dtype = rcfg.torch_dtype
        S, H = rcfg.max_seq_len, cfg.hidden_size
        # module: KV in host memory, staged per attention micro-batch. model: one batch walks the whole
        # model with its KV on the device, so B is what fits there beside the weight slots.
        self.kv_on_device = rcfg.batching == "model"
        B = self.batch_size = model_batch_size(cfg, rcfg, weights, backend) if self.kv_on_device else rcfg.batch_size
        self._check_host_kv(dtype)
        self.micro_batch = B if self.kv_on_device else min(rcfg.attn_micro_batch, B)  # sequences per attention launch
        # B-1 decode tokens + one longest prompt must always fit; never more than every row's whole context.
        self.max_step_tokens = min(B * S, max(rcfg.max_step_tokens, B - 1 + S))
        if self.kv_on_device:  # every row, every layer
            kv_bytes = B * S * kv_bytes_per_token(cfg, dtype)
        else:  # two staging buffers of one layer's KV for a micro-batch, shared by all layers
            kv_bytes = 2 * self.micro_batch * S * kv_bytes_per_token(cfg, dtype) // cfg.num_layers
        self.placement = Placement(backend, weights, dtype, kv_bytes + activation_bytes(cfg, rcfg, self.max_step_tokens),
                                   rcfg.expert_slots)
        self.core = self.placement.core
        self.rope = Rope(cfg.attention.rope, device=backend.device)
        kv_device = backend.device if self.kv_on_device else "cpu"
        pin = not self.kv_on_device and backend.device.type == "cuda"
        self.kv: list[LayerKV] = allocate_kv(cfg, B, S, dtype, kv_device, pin)  # every sequence in flight
        # Two staging buffers, so one micro-batch's KV comes in while the previous one computes.
        self.staging_kv = [] if self.kv_on_device else [
            layer_kv(cfg.attention, self.micro_batch, S, dtype, backend.device) for _ in range(2)]
        self.last_writeback: list[Event | None] = [None] * cfg.num_layers
        self.h, self.x, self.out = (torch.empty(self.max_step_tokens, H, dtype=dtype, device=backend.device)
                                    for _ in range(3))
        self.ids_buffer = torch.empty(self.max_step_tokens, dtype=torch.int64, device=backend.device)
        self.stats = EngineStats()
        self.queued: dict[str, int] = {}  # tokens waiting per module type (traced runs only)
        self.queue_tracks = {kind: backend.recorder.counter_track(f"tokens waiting: {kind}")
                             for kind in ("attention", "router", "experts")} if backend.recorder is not None else {}
        # What lives in host memory for the run (pinned on cuda): the weight arena and the KV cache.
        self.host_bytes = sum(b.nbytes for b in self.placement.blocks.values()) + (
            0 if self.kv_on_device else B * S * kv_bytes_per_token(cfg, dtype))
        backend.synchronize()  # start-up copies done before any stream reads them

    def _check_host_kv(self, dtype: torch.dtype) -> None:
        need = kv_bytes_per_token(self.cfg, dtype) * self.batch_size * self.rcfg.max_seq_len
        if self.rcfg.host_kv_memory is not None and need > self.rcfg.host_kv_memory:
            raise ValueError(
                f"the KV cache for --batch-size {self.batch_size} sequences of up to {self.rcfg.max_seq_len} "
                f"tokens needs {need / 2**30:.2f} GiB, over --host-kv-memory {self.rcfg.host_kv_memory / 2**30:.2f} "
                "GiB; lower --batch-size or --max-seq-len, or raise --host-kv-memory")

    def new_queues(self) -> Queues:
        L, E = self.cfg.num_layers, self.cfg.moe.router.num_experts

        def q() -> asyncio.Queue:
            return asyncio.Queue(QUEUE_DEPTH)

        return Queues(
            embed=q(), head=q(), prefetch=q(),
            attn=[q() for _ in range(L)], router=[q() for _ in range(L)], combine=[q() for _ in range(L)],
            mlp=[q() for _ in range(L)],
            expert=[[q() for _ in range(E)] if self.core.routers[layer] is not None else [] for layer in range(L)],
        )

    # -- tracing (all no-ops when off) ----------------------------------------------------------

    @property
    def recorder(self):
        return self.backend.recorder

    def label(self, name: str, flows_in: tuple[int, ...] = (), flows_out: tuple[int, ...] = (), **args):
        """A slice label for a stream work item, or None when not tracing."""
        if self.backend.recorder is None:
            return None
        from moegen.trace.recorder import Label

        return Label(name, args, flows_out=flows_out, flows_in=flows_in)

    def attention_label(self, layer: int, step: Step, mb, flows_in: tuple[int, ...]):
        if self.backend.recorder is None:
            return None
        return self.label(f"attention[{layer}]", flows_in=flows_in, layer=layer, step=step.index,
                          micro_batch=mb.index, sequences=len(mb.rows), tokens=sum(mb.q_lens))

    def waiting(self, kind: str, tokens: int) -> None:
        """Tokens queued in front of a module type (attention, router, experts): a trace counter."""
        if self.backend.recorder is None or not tokens:
            return
        self.queued[kind] = self.queued.get(kind, 0) + tokens
        self.backend.recorder.counter(self.queue_tracks[kind], self.queued[kind])

    def mark_unused_copy(self, module, flow: int) -> None:
        """A weight copy nobody used (its expert got no tokens once routed): its flow ends on an empty
        marker queued on the copy stream itself, so it lands right after that copy in the trace."""
        from moegen.trace.recorder import Label

        self.backend.h2d_weights.submit(lambda: None, Label(f"unused {module}", {}, flows_in=(flow,)))

    @staticmethod
    def mlp_flops(w, tokens: int) -> int:
        """2 FLOPs per multiply-add over the three projections of a SwiGLU MLP."""
        return 2 * tokens * (w.gate_proj.numel() + w.up_proj.numel() + w.down_proj.numel())

    async def read(self, after: Event, get: Callable[[], Tensor]) -> Tensor:
        """A device tensor produced by the work ending at `after`, on the host (a named sync point)."""
        await self.backend.wait(after)
        return get().to("cpu")

    def new_step(self, plan: StepPlan) -> Step:
        """The step's state, its small tensors on the host (the embedding launch moves them)."""
        T = plan.num_tokens
        if T > self.max_step_tokens:
            raise ValueError(f"a step of {T} tokens exceeds the {self.max_step_tokens} planned for")
        seqs = plan.seqs
        sampling = SamplingParams(
            temperature=torch.tensor([s.request.temperature for s in seqs], dtype=torch.float32),
            top_k=torch.tensor([s.request.top_k for s in seqs], dtype=torch.int64),
            top_p=torch.tensor([s.request.top_p for s in seqs], dtype=torch.float32),
            seeds=torch.tensor([s.request.seed for s in seqs], dtype=torch.int64),
            counters=torch.tensor([len(s.result.token_ids) for s in seqs], dtype=torch.int64),
            greedy_only=all(s.request.temperature == 0 for s in seqs),
        )
        loop = asyncio.get_running_loop()
        return Step(
            plan=plan,
            micro=micro_batches(plan, self.micro_batch, staged=not self.kv_on_device),
            h=self.h[:T], x=self.x, out=self.out,
            last_token=torch.tensor(plan.q_lens).cumsum(0) - 1,  # [B] each sequence's last token
            sampling=sampling,
            routing=[Routing() for _ in range(self.cfg.num_layers)],
            counts=[loop.create_future() for _ in range(self.cfg.num_layers)],
        )


class Engine:
    """A model directory on a backend. `generate(requests)` yields each result as it finishes."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, rcfg: RuntimeConfig, eos_ids: tuple[int, ...],
                 record_intervals: bool = False, trace: Path | None = None, trace_steps: range | None = None):
        self.cfg, self.rcfg, self.eos_ids = cfg, rcfg, eos_ids
        self.backend = make_backend(rcfg, record_intervals)
        self.trace = StepTracer(trace, trace_steps, self.backend) if trace is not None else None
        self.runtime = Runtime(cfg, rcfg, self.backend, weights)
        self._draining = threading.Event()

    @property
    def stats(self) -> EngineStats:
        return self.runtime.stats

    @classmethod
    def from_model_dir(cls, model_dir: Path, rcfg: RuntimeConfig, record_intervals: bool = False,
                       trace: Path | None = None, trace_steps: range | None = None) -> Engine:
        cfg, weights, _ = load_checkpoint(model_dir, rcfg.torch_dtype)
        return cls(cfg, weights, rcfg, generation_eos_ids(model_dir, cfg), record_intervals, trace, trace_steps)

    def close(self) -> None:
        """Stop the backend's stream threads; finish the trace file."""
        self.backend.close()
        if self.trace is not None:
            self.trace.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def drain(self) -> None:
        """From any thread: admit no more prompts; the sequences in flight finish and are yielded."""
        self._draining.set()

    def generate(self, requests: Iterable[Request], detokenize: Callable[[list[int]], str] | None = None
                 ) -> Iterator[Result]:
        """Run every request; yield each result when its sequence finishes. `detokenize` (ids -> text)
        is needed only for requests with stop strings."""
        requests = list(requests)
        self._draining.clear()
        for i, r in enumerate(requests):
            if len(r.prompt_ids) + r.max_new_tokens > self.rcfg.max_seq_len:
                raise ValueError(f"request {r.id if r.id is not None else i}: {len(r.prompt_ids)} prompt tokens + "
                                 f"{r.max_new_tokens} new ones exceed --max-seq-len {self.rcfg.max_seq_len}")
        results: queue.Queue = queue.Queue()
        done = object()

        started: queue.Queue = queue.Queue()

        async def main() -> None:
            started.put((asyncio.get_running_loop(), asyncio.current_task()))
            await self._run(requests, results.put, detokenize)

        def run() -> None:
            import uvloop

            try:
                uvloop.run(main())
            except BaseException as exc:  # handed to the caller's thread, traceback intact
                results.put(exc)
            results.put(done)

        thread = threading.Thread(target=run, name="moegen-loop", daemon=True)
        thread.start()
        loop, task = started.get()
        try:
            while (item := results.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # also when the caller stops early (an exception, a second Ctrl-C): end the run
            if thread.is_alive():
                loop.call_soon_threadsafe(task.cancel)
            thread.join()

    async def _run(self, requests: list[Request], emit: Callable[[Result], None],
                   detokenize: Callable[[list[int]], str] | None = None) -> None:
        rt = self.runtime
        rt.queues = rt.new_queues()
        rt.staging = asyncio.Queue()  # free staging buffers, with the write-back each must wait for
        for slot in range(len(rt.staging_kv)):
            rt.staging.put_nowait((slot, None))
        scheduler = Scheduler(requests, rt.batch_size, self.eos_ids, rt.max_step_tokens, detokenize,
                              admitting=lambda: not self._draining.is_set())
        try:
            async with asyncio.TaskGroup() as group:
                for coro in all_tasks(rt):
                    group.create_task(coro)
                group.create_task(self._step_loop(scheduler, emit))
        except BaseExceptionGroup as group_error:
            raise _first_cause(group_error) from None

    async def _step_loop(self, scheduler: Scheduler, emit: Callable[[Result], None]) -> None:
        """The engine step: plan -> feed the pipeline -> wait for the sampled ids -> finish sequences."""
        rt = self.runtime
        while (plan := scheduler.next_step()) is not None:
            step = rt.new_step(plan)
            rt.stats.steps += 1
            rt.stats.tokens_per_step.append(plan.num_tokens)
            began = self.trace.begin_step(plan.index) if self.trace is not None else 0
            await rt.queues.prefetch.put(step)
            await rt.queues.embed.put(step)
            sampled = await step.sampled
            if self.trace is not None:
                self.trace.end_step(plan, began, rt.stats.generated_tokens + len(sampled), len(scheduler.waiting),
                                    rt.host_bytes)
            rt.stats.generated_tokens += len(sampled)
            for result in scheduler.finish_step(plan, sampled):
                emit(result)
        for q in all_queues(rt.queues):
            q.put_nowait(STOP)


class StepTracer:
    """The loop's side of a trace: a track for the event loop (step slices), then the streams', then
    counters; `--trace-steps A:B` records only those steps."""

    def __init__(self, path: Path, steps: range | None, backend: Backend):
        from moegen.trace.recorder import TraceRecorder

        self.recorder = TraceRecorder(path, steps)
        self.backend = backend
        self.loop_track = self.recorder.track("event loop")
        backend.trace_to(self.recorder)
        self.counters = {name: self.recorder.counter_track(name, unit) for name, unit in (
            ("sequences in flight", None), ("sequences waiting", None), ("tokens in step", None),
            ("generated tokens", None), ("device memory in use", "bytes"), ("host memory: weights + KV", "bytes"))}

    def begin_step(self, index: int) -> int:
        self.recorder.enabled = self.recorder.steps is None or index in self.recorder.steps
        return time.time_ns()

    def end_step(self, plan: StepPlan, began: int, generated: int, waiting: int, host_bytes: int) -> None:
        from moegen.trace.recorder import Label

        prefill = sum(q for q in plan.q_lens if q > 1)
        phase = "prefill" if prefill == plan.num_tokens else "decode" if prefill == 0 else "prefill+decode"
        self.recorder.slice(self.loop_track, Label(f"step {plan.index} ({phase})", {
            "step": plan.index, "phase": phase, "sequences": len(plan.seqs), "prefill_tokens": prefill,
            "decode_tokens": plan.num_tokens - prefill}), began, time.time_ns())
        for name, value in (("sequences in flight", len(plan.seqs)), ("sequences waiting", waiting),
                            ("tokens in step", plan.num_tokens), ("generated tokens", generated),
                            ("device memory in use", self.backend.counters.device_bytes),
                            ("host memory: weights + KV", host_bytes)):
            self.recorder.counter(self.counters[name], value)

    def close(self) -> None:
        self.recorder.close()


def activation_bytes(cfg: ModelConfig, rcfg: RuntimeConfig, max_step_tokens: int) -> int:
    """The residual stream, router input and expert-output sum of the largest step, plus its token ids."""
    return max_step_tokens * (3 * cfg.hidden_size * torch.empty((), dtype=rcfg.torch_dtype).element_size() + 8)


def model_batch_size(cfg: ModelConfig, rcfg: RuntimeConfig, weights: ModelWeights, backend: Backend) -> int:
    """--batching model: the largest B (up to --batch-size) whose device KV and activations fit beside
    the smallest weight placement."""
    if backend.budget is None:
        return rcfg.batch_size
    free = backend.budget - backend.counters.device_bytes - minimum_device_bytes(weights, rcfg.torch_dtype,
                                                                                 rcfg.expert_slots)
    per_seq = rcfg.max_seq_len * kv_bytes_per_token(cfg, rcfg.torch_dtype)
    S = rcfg.max_seq_len
    for B in range(rcfg.batch_size, 0, -1):
        steps = min(B * S, max(rcfg.max_step_tokens, B - 1 + S))
        if B * per_seq + activation_bytes(cfg, rcfg, steps) <= free:
            return B
    raise DeviceBudgetError(
        f"--batching model: not even one sequence's KV ({per_seq / 2**20:.1f} MiB for --max-seq-len {S}) fits "
        f"in --gpu-memory {backend.budget / 2**20:.1f} MiB beside the weights; raise --gpu-memory or lower --max-seq-len")


def make_backend(rcfg: RuntimeConfig, record_intervals: bool = False) -> Backend:
    if rcfg.device == "cuda":
        from moegen.runtime.cuda_backend import CudaBackend

        return CudaBackend(budget=rcfg.gpu_memory)
    return CpuBackend(budget=rcfg.gpu_memory, link_gbps=rcfg.sim_link_gbps, record_intervals=record_intervals)


def _first_cause(group: BaseExceptionGroup) -> BaseException:
    """The exception that started the cancellation (not a CancelledError)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_cause(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
