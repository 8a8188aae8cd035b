"""The cuda backend: torch streams and events; pinned host memory; device buffers under a budget.

Submitting work enqueues its kernels on the stream from the event loop's thread (a launch is
asynchronous) and records an event after them. Streams wait on each other's events on the GPU;
the host waits only through a waiter thread that synchronizes on an event and resolves the
asyncio future with `call_soon_threadsafe`, so the loop keeps scheduling other modules meanwhile.

While tracing, a labelled work item is bracketed by two timing events; once both have completed
(checked after each step, never waited for) its slice is written with device times mapped onto
the host's `time.time_ns()` through a `DeviceClock` anchored when tracing began.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moegen.runtime.backend import Backend, Counters, Event, Stream, resolve_future
from moegen.runtime.worker_stream import host_streams


class CudaEvent(Event):
    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def block(self) -> None:
        self.event.synchronize()


class DeviceClock:
    """Device event times on the host clock: an anchor event that completed at host time `host_ns`
    (read right after it did, so slices may sit a few microseconds early); an event's time is the
    anchor's plus the device-measured milliseconds between them."""

    def __init__(self, anchor, host_ns: int):
        self.anchor, self.host_ns = anchor, host_ns

    @classmethod
    def now(cls, stream: torch.cuda.Stream) -> DeviceClock:
        anchor = torch.cuda.Event(enable_timing=True)
        anchor.record(stream)
        anchor.synchronize()
        return cls(anchor, time.time_ns())

    def to_host_ns(self, event) -> int:
        return self.host_ns + round(self.anchor.elapsed_time(event) * 1e6)


@dataclass(slots=True)
class TimedWork:
    """A labelled work item whose device start and end events have not been read yet."""

    track: int  # its stream's trace track
    label: object  # the trace Label
    start: object  # torch.cuda.Event(enable_timing=True), recorded before its kernels
    end: object  # recorded after them


def write_finished(pending: list[TimedWork], clock: DeviceClock, recorder) -> list[TimedWork]:
    """Write a slice for each work item whose end event has completed; return the others (the
    device finishes each stream's work in order, so this never blocks and never reorders a track)."""
    left = []
    for work in pending:
        if work.end.query():
            recorder.slice(work.track, work.label, clock.to_host_ns(work.start), clock.to_host_ns(work.end))
        else:
            left.append(work)
    return left


class CudaStream(Stream):
    def __init__(self, name: str, backend: CudaBackend):
        self.name = name
        self.backend = backend
        self.track = 0  # trace track uuid
        self.stream = torch.cuda.Stream(device=backend.device)

    def submit(self, fn: Callable[[], object], label=None, concurrent: bool = False) -> CudaEvent:
        timed = label is not None and self.backend.recorder is not None
        with torch.cuda.stream(self.stream):
            if timed:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
            fn()
            event = torch.cuda.Event(enable_timing=timed)
            event.record(self.stream)
        if timed:
            self.backend.timed.append(TimedWork(self.track, label, start, event))
        return CudaEvent(event)

    def wait_event(self, event: Event) -> None:
        if not isinstance(event, CudaEvent):  # a host worker's event: the runtime awaits those before submitting
            raise TypeError(f"the {self.name} stream can only wait on device events, not {type(event).__name__}")
        self.stream.wait_event(event.event)


class CudaBackend(Backend):
    """One GPU. `budget` defaults to the device's free memory less a 1 GiB margin for kernels' workspaces."""

    MARGIN = 2**30

    @classmethod
    def default_budget(cls, device: torch.device) -> int:
        """The budget when --gpu-memory is unset: the device's free memory less MARGIN."""
        free, _total = torch.cuda.mem_get_info(device)
        return max(0, free - cls.MARGIN)

    def __init__(self, budget: int | None = None, index: int = 0):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device here; use --device cpu")
        self.name = "cuda"
        self.device = torch.device("cuda", index)
        self.counters = Counters()
        self.locked = []
        self.budget = budget if budget is not None else self.default_budget(self.device)
        self.timed: list[TimedWork] = []  # traced work not yet written (its events may still be pending)
        self.clock: DeviceClock | None = None
        self.compute, self.h2d_weights, self.h2d_kv, self.d2h = (
            CudaStream(name, self) for name in ("compute", "copy H2D weights", "copy H2D KV", "copy D2H"))
        self.host_gather, self.host_scatter, self.host_attention = host_streams(self)
        self._waits: queue.SimpleQueue = queue.SimpleQueue()
        self._waiter = threading.Thread(target=self._wait_loop, name="moegen-cuda-waiter", daemon=True)
        self._waiter.start()

    def _wait_loop(self) -> None:
        while (item := self._waits.get()) is not None:
            event, loop, fut = item
            error = None
            try:
                event.event.synchronize()
            except BaseException as exc:  # a failed kernel surfaces here, to whoever waits
                error = exc
            try:
                loop.call_soon_threadsafe(resolve_future, fut, error)
            except RuntimeError:  # a cancelled run's loop is closed: nobody awaits there any more
                pass

    async def wait(self, event: Event) -> None:
        if event.done():
            return
        if not isinstance(event, CudaEvent):  # a host worker's event resolves its future itself
            await event.future()
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waits.put((event, loop, fut))
        await fut

    def trace_to(self, recorder) -> None:
        super().trace_to(recorder)
        torch.cuda.synchronize(self.device)
        self.clock = DeviceClock.now(self.compute.stream)

    def write_timings(self) -> None:
        """Write the slices of traced work that has finished on the device (after each step)."""
        if self.recorder is not None and self.timed:
            self.timed = write_finished(self.timed, self.clock, self.recorder)

    def _page_lock(self, buffer: Tensor, nbytes: int, what: str) -> None:
        """cudaHostRegister: the pages stay where they are, at their exact size, and copies from them are
        asynchronous DMA."""
        code = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0))
        if code != 0:
            raise RuntimeError(
                f"page-locking {what} ({nbytes / 2**30:.2f} GiB of host memory) failed with CUDA error {code}; the "
                "host may not allow that much locked memory (ulimit -l) or have it free: lower --batch-size or "
                "--max-seq-len (the KV cache) or use a host with more memory")

    def _page_unlock(self, buffer: Tensor) -> None:
        torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())

    def submit_copy(self, stream: Stream, fn: Callable[[], object], nbytes: int, label=None) -> CudaEvent:
        self._count_copy(stream, nbytes)
        return stream.submit(fn, label)

    def synchronize(self) -> None:
        for stream in self.host_workers:
            stream.submit(lambda: None, waiting=True).settle()
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self._waits.put(None)
        self._waiter.join()
        for stream in self.host_workers:
            stream.cancel_pending()
            stream.close()
        torch.cuda.synchronize(self.device)
        self.write_timings()
        self.unlock_host()  # nothing reads the buffers any more: every copy has completed


