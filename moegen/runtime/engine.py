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
from pathlib import Path
from typing import TYPE_CHECKING

from moegen.config import ModelConfig
from moegen.models.hf_config import generation_eos_ids
from moegen.models.loader import load_checkpoint
from moegen.models.weights import ModelWeights
from moegen.runtime.auto import resolve_dtype
from moegen.runtime.backend import Backend
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.context import STOP, EngineStats, Runtime
from moegen.runtime.cpu_backend import CpuBackend
from moegen.runtime.host_memory import limit_malloc_arenas
from moegen.runtime.kv.manager import KVManager
from moegen.runtime.kv.sizing import too_long
from moegen.runtime.requests import Request, Result
from moegen.runtime.scheduler import Scheduler
from moegen.runtime.tasks import all_tasks, prefetch_task

if TYPE_CHECKING:
    from moegen.runtime.stream import EngineStream, Intake
    from moegen.trace.memory import MemoryRecorder


class Engine:
    """A model directory on a backend. `generate(requests)` yields each result as it finishes.
    `trace`: a Perfetto trace file to write (`--trace`), or a recorder to record into (the planner's
    in-memory one); None records nothing."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, rcfg: RuntimeConfig, eos_ids: tuple[int, ...],
                 record_intervals: bool = False, trace: Path | MemoryRecorder | None = None,
                 trace_steps: range | None = None):
        rcfg = resolve_dtype(rcfg, loaded=weights.norm.dtype)  # --dtype auto: the weights' own
        self.cfg, self.rcfg, self.eos_ids = cfg, rcfg, eos_ids
        limit_malloc_arenas()  # before the stream threads: they would each hoard freed activations
        self.backend = make_backend(rcfg, record_intervals)
        self.trace = None
        if trace is not None:
            from moegen.trace.steps import StepTracer

            self.trace = StepTracer(trace, trace_steps, self.backend)
        self.runtime = Runtime(cfg, rcfg, self.backend, weights)
        self.quantized = None  # what --weight-dtype quantized when the weights were loaded (`from_model_dir`)
        self._draining = threading.Event()
        self._runs = 0  # runs started (the first has nothing of an earlier one to wait for)

    @property
    def stats(self) -> EngineStats:
        return self.runtime.stats

    @classmethod
    def from_model_dir(cls, model_dir: Path, rcfg: RuntimeConfig, record_intervals: bool = False,
                       trace: Path | None = None, trace_steps: range | None = None) -> Engine:
        rcfg = resolve_dtype(rcfg, model_dir)
        cfg, weights, report = load_checkpoint(model_dir, rcfg.torch_dtype, rcfg.weight_dtype)
        engine = cls(cfg, weights, rcfg, generation_eos_ids(model_dir, cfg), record_intervals, trace, trace_steps)
        engine.quantized = report.quantized
        return engine

    def close(self) -> None:
        """Stop the backend's stream threads, release what it page-locked and the run's buffers; finish the
        trace file."""
        self.backend.close()
        self.runtime.close()
        if self.trace is not None:
            self.trace.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def drain(self) -> None:
        """From any thread: admit no more prompts; the sequences in flight finish and are yielded."""
        self._draining.set()

    def check(self, requests: list[Request]) -> None:
        """Refuse (ValueError, naming the request and the flag) a request the run can't hold."""
        capacity = self.runtime.kv_blocks * self.runtime.kv_block_size
        for i, r in enumerate(requests):
            if len(r.prompt_ids) + r.max_new_tokens > self.rcfg.max_seq_len:
                raise ValueError(f"request {r.id if r.id is not None else i}: {len(r.prompt_ids)} prompt tokens + "
                                 f"{r.max_new_tokens} new ones exceed --max-seq-len {self.rcfg.max_seq_len}; raise "
                                 "--max-seq-len or lower --max-new-tokens")
            if (why := too_long(len(r.prompt_ids), capacity)) is not None:
                raise ValueError(f"request {r.id if r.id is not None else i}: {why}")

    def stream(self, detokenize: Callable[[list[int]], str] | None = None) -> EngineStream:
        """One run that takes requests while it runs, from any thread (`EngineStream.submit`): several
        callers keep one batch full, each getting its own results. Close it to end the run."""
        from moegen.runtime.stream import EngineStream

        return EngineStream(self, detokenize)

    def generate(self, requests: Iterable[Request], detokenize: Callable[[list[int]], str] | None = None
                 ) -> Iterator[Result]:
        """Run every request; yield each result when its sequence finishes. `detokenize` (ids -> text)
        is needed only for requests with stop strings."""
        requests = list(requests)
        self._draining.clear()
        self.check(requests)
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
                   detokenize: Callable[[list[int]], str] | None = None, intake: Intake | None = None) -> None:
        """One run: `requests`, and with an `intake` those that arrive through it until it closes (their caps
        unknown ahead, admission reserves each row's own)."""
        rt = self.runtime
        rt.queues = rt.new_queues()
        caps = {r.max_new_tokens for r in requests}
        if intake is None:
            kv = KVManager(rt.kv_pool, rt.kv_block_size, rt.stats.kv, max(caps, default=1), adaptive=len(caps) == 1)
        else:
            kv = KVManager(rt.kv_pool, rt.kv_block_size, rt.stats.kv, self.rcfg.max_seq_len, adaptive=False)
        scheduler = Scheduler(requests, rt.batch_size, self.eos_ids, rt.max_step_tokens, kv, detokenize,
                              admitting=lambda: not self._draining.is_set())
        rt.placement.reset(after_a_run=self._runs > 0)  # nothing held over from an earlier run
        self._runs += 1
        if rt.stager is not None:
            rt.stager.reset()
        if rt.host_attention is not None:
            rt.host_attention.reset()
        try:
            async with asyncio.TaskGroup() as group:
                for coro in all_tasks(rt):
                    group.create_task(coro)
                prefetcher = group.create_task(prefetch_task(rt))
                group.create_task(self._step_loop(scheduler, emit, prefetcher, intake))
        except BaseExceptionGroup as group_error:
            raise _first_cause(group_error) from None
        finally:  # done, drained, cancelled or failed: no block stays held
            scheduler.close()

    async def _step_loop(self, scheduler: Scheduler, emit: Callable[[Result], None], prefetcher: asyncio.Task,
                         intake: Intake | None = None) -> None:
        """The engine step: plan -> feed the pipeline -> wait for the sampled ids -> finish sequences.
        With an intake, what arrived joins the waiting before each step, and an idle run waits for more
        until the intake closes. At the end the prefetcher is cancelled: it may be waiting for a slot to
        fill for a step that never comes."""
        rt = self.runtime
        while True:
            if intake is not None:
                scheduler.add(intake.arrived())
            if (plan := scheduler.next_step()) is None:
                if intake is None or not (more := await intake.wait()):
                    break
                scheduler.add(more)
                continue
            step = rt.new_step(plan)
            rt.stats.steps += 1
            rt.stats.tokens_per_step.append(plan.num_tokens)
            rt.stats.sequences_per_step.append(len(plan.seqs))
            began = self.trace.begin_step(plan.index) if self.trace is not None else 0
            decoding, t0 = sum(1 for s in plan.seqs if s.result.token_ids), time.perf_counter()
            await rt.queues.prefetch.put(step)
            await rt.queues.embed.put(step)
            sampled = await step.sampled
            rt.stats.step_log.append((time.perf_counter() - t0, decoding, plan.num_tokens - decoding))
            if self.trace is not None:
                pool = rt.kv_pool
                self.trace.end_step(plan, began, rt.stats.generated_tokens + len(sampled), len(scheduler.waiting),
                                    rt.host_bytes, pool.num_blocks - pool.num_free)
            rt.stats.generated_tokens += len(sampled)
            finished = scheduler.finish_step(plan, sampled)
            rt.stats.running = ([s.request.max_new_tokens - len(s.result.token_ids) for s in scheduler.running],
                                sum(s.request.max_new_tokens for s in scheduler.running))
            for result in finished:
                emit(result)
        prefetcher.cancel()
        for module, ticket in rt.placement.unclaimed():  # in a trace, their copies' flows end unused, and
            if ticket.flow:  # the markers run before the run ends (closing drops work still queued)
                await rt.backend.wait(rt.mark_unused_copy(module, ticket.flow))
        for q in rt.queues.all():
            q.put_nowait(STOP)


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
