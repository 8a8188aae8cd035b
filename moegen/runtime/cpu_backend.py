"""The cpu backend: each stream is a worker thread running submitted work in order; events are
thread-safe flags that also resolve asyncio futures.

torch releases the GIL inside ops, so the copy thread and the compute thread really overlap.
The "device" is a separate, budgeted set of buffers in host memory: a module that isn't
resident is copied into a slot by the copy worker (a real memcpy, throttled to the simulated
link bandwidth when one is set), so offload and overlap are real code paths without a GPU.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable

import torch
from torch import Tensor

from moegen.runtime.backend import Backend, Counters, Event, Stream, resolve_future


class CpuEvent(Event):
    """Set by a worker thread when the work before it is done (or failed)."""

    def __init__(self):
        self._flag = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self._flag.is_set()

    def finish(self, error: BaseException | None = None) -> None:
        with self._lock:
            self.error = error
            self._flag.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(resolve_future, fut, error)
            except RuntimeError:  # a cancelled run's loop is closed: nobody awaits there any more
                pass

    def settle(self) -> None:
        """Block until the work before it has ended, failed or not (its error stays with it)."""
        self._flag.wait()

    def block(self) -> None:
        """Wait on a worker thread (a stream-side wait); re-raises the work's error."""
        self._flag.wait()
        if self.error is not None:
            raise self.error

    def future(self) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if not self._flag.is_set():
                self._waiters.append((loop, fut))
                return fut
        resolve_future(fut, self.error)
        return fut


class CpuStream(Stream):
    """A worker thread; work items run in submission order."""

    def __init__(self, name: str, counters: Counters, record: bool = False, backend=None):
        self.name = name
        self.backend = backend  # its recorder, when tracing
        self.track = 0  # trace track uuid
        self._counters = counters
        self.intervals: list[tuple[float, float]] | None = [] if record else None  # (start, end) of each item
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"moegen-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], object], label=None, waiting: bool = False) -> CpuEvent:
        event = CpuEvent()
        self._queue.put((fn, event, waiting, label))
        return event

    def wait_event(self, event: Event) -> None:
        self.submit(event.block, waiting=True)  # idle time, not work: kept out of busy time and intervals

    def cancel_pending(self) -> None:
        """Fail every queued item without running it, waking whatever waits on its event (a run
        that was abandoned may have left waits on work that will never be submitted)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].finish(RuntimeError(f"{self.name} stream closed before this work ran"))

    def close(self) -> None:
        """End the thread after the item it is running (an orderly exit: no torch op cut off mid-run)."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        busy, error = 0.0, None
        while (item := self._queue.get()) is not None:
            fn, event, waiting, label = item
            if error is not None:  # sticky, as on a GPU: after a failure every later event reports it
                event.finish(error)
                continue
            start, wall_start = time.perf_counter(), time.time_ns()
            try:
                fn()
            except BaseException as exc:  # the error travels with the event to whoever waits on it
                error = exc
                event.finish(exc)
            else:
                event.finish()
            if waiting:
                continue
            end = time.perf_counter()
            recorder = self.backend.recorder if self.backend is not None else None
            if recorder is not None and label is not None:
                recorder.slice(self.track, label, wall_start, time.time_ns())
            busy += end - start
            if self.intervals is not None:
                self.intervals.append((start, end))
            self._counters.busy_s[self.name] = busy


class CpuBackend(Backend):
    """Streams on threads; device buffers in host memory under a byte budget; an optional simulated link."""

    def __init__(self, budget: int | None = None, link_gbps: float | None = None, record_intervals: bool = False):
        self.name = "cpu"
        self.device = torch.device("cpu")
        self.counters = Counters()
        self.budget = budget
        self.link_gbps = link_gbps  # simulated host<->device bandwidth, GB/s (1e9 bytes); None = memcpy speed
        self.compute, self.h2d_weights, self.h2d_kv, self.d2h = (
            CpuStream(name, self.counters, record_intervals, self)
            for name in ("compute", "copy H2D weights", "copy H2D KV", "copy D2H"))

    async def wait(self, event: Event) -> None:
        await event.future()

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dtype)

    def place(self, t: Tensor, dtype: torch.dtype, what: str, fix: str | None = None) -> Tensor:
        """Counted against the budget, but not copied: this device's memory is host memory, and a
        weight that is only read can be read where it is (a second copy would double the host RAM)."""
        self.reserve(t.numel() * torch.empty((), dtype=dtype).element_size(), what, fix)
        return t.to(dtype)

    def submit_copy(self, stream: Stream, fn: Callable[[], object], nbytes: int, label=None) -> CpuEvent:
        self._count_copy(stream, nbytes)
        return stream.submit(lambda: self._throttled(fn, nbytes), label)

    def _throttled(self, fn: Callable[[], object], nbytes: int) -> None:
        """Run a copy, then sleep out the rest of the time the simulated link would have taken."""
        start = time.perf_counter()
        fn()
        if self.link_gbps:
            left = nbytes / (self.link_gbps * 1e9) - (time.perf_counter() - start)
            if left > 0:
                time.sleep(left)

    def synchronize(self) -> None:
        for stream in self.streams:
            stream.submit(lambda: None, waiting=True).settle()

    def close(self) -> None:
        streams = (self.compute, self.h2d_weights, self.h2d_kv, self.d2h)
        for stream in streams:
            stream.cancel_pending()
        for stream in streams:
            stream.close()
