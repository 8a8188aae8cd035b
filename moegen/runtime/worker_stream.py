"""A stream on a worker thread: submitted work runs in order, events are thread-safe flags that also
resolve asyncio futures. The cpu backend's streams are these; on every backend the host's own KV
work (gathers into page-locked staging, scatters out of it) runs on two of them.

torch releases the GIL inside ops, so work on different worker threads really overlaps. A stream
may also have lanes: launches submitted as `concurrent` run side by side on lane threads that
share the intra-op threads between them (the cpu compute stream; see `cpu_threads.cpu_lanes`).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable

import torch

from moegen.intervals import length, union
from moegen.runtime.backend import Counters, Event, Stream, resolve_future


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
    """A worker thread; work items run in submission order.

    With lanes > 1, consecutive items submitted as `concurrent` are handed to `lanes` lane threads
    (each with intra-op threads / lanes torch threads) and run side by side, each free lane taking
    the next; any other item but a `wait_event` first waits until all of them have ended. So the
    stream's order holds between groups, and inside a group the items must commute (the runtime's expert and MLP
    launches of a layer: each adds into the step's output under its lock). An item's event marks
    its own end; a later non-concurrent item's event marks the end of everything before it."""

    def __init__(self, name: str, counters: Counters, record: bool = False, backend=None, lanes: int = 1):
        self.name = name
        self.backend = backend  # its recorder, when tracing
        self.track = 0  # trace track uuid
        self.lanes = lanes
        self.lane_tracks: list[int] = []  # trace track uuid of each lane, set by Backend.trace_to
        self._counters = counters
        self.intervals: list[tuple[float, float]] | None = [] if record else None  # (start, end) of each item
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lane_queue: queue.SimpleQueue = queue.SimpleQueue()
        threads = torch.get_num_threads()
        started = threading.Barrier(lanes + 1 if lanes > 1 else 1)
        self._lane_threads = [threading.Thread(target=self._lane, args=(i, max(1, threads // lanes), started),
                                               name=f"moegen-{name}-lane{i + 1}", daemon=True)
                              for i in range(lanes if lanes > 1 else 0)]
        for thread in self._lane_threads:
            thread.start()
        started.wait()
        # torch.set_num_threads also sets the count every thread started later begins with: put it back
        torch.set_num_threads(threads)
        self._thread = threading.Thread(target=self._run, name=f"moegen-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], object], label=None, waiting: bool = False, concurrent: bool = False) -> CpuEvent:
        event = CpuEvent()
        self._queue.put((fn, event, waiting, label, "concurrent" if concurrent and self.lanes > 1 else None))
        return event

    def wait_event(self, event: Event) -> None:
        # Idle time, not work: kept out of busy time and intervals. It orders what comes after it, so a
        # concurrent group before it keeps running on the lanes meanwhile (a streamed expert waiting
        # for its copy does not stop the one before it).
        self._queue.put((event.block, CpuEvent(), True, None, "wait"))

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
        group: list[tuple[CpuEvent, list[float]]] = []  # the concurrent items handed to the lanes, and when each ran
        while (item := self._queue.get()) is not None:
            fn, event, waiting, label, mode = item
            if mode == "concurrent" and error is None:
                ran: list[float] = []
                group.append((event, ran))
                self._lane_queue.put((fn, event, label, ran))
                continue
            if group and mode != "wait":
                error, busy = self._join(group, error, busy)
                group = []
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
        if group:
            self._join(group, error, busy)
        for _ in self._lane_threads:
            self._lane_queue.put(None)
        for thread in self._lane_threads:
            thread.join()

    def _join(self, group, error: BaseException | None, busy: float) -> tuple[BaseException | None, float]:
        """Wait for a concurrent group; the stream's error (the first of the group's, if none yet) and busy
        time, which counts the time any of its items ran (not the waits for copies between them)."""
        for event, _ in group:
            event.settle()
            error = error or event.error
        spans = union(tuple(ran) for _, ran in group if ran)
        busy += length(spans)
        if self.intervals is not None:
            self.intervals.extend(spans)
        self._counters.busy_s[self.name] = busy
        return error, busy

    def _lane(self, index: int, threads: int, started: threading.Barrier) -> None:
        """One lane thread: runs concurrent items as they come, on `threads` intra-op threads."""
        torch.get_num_threads()  # torch sets a thread's count from the last one set anywhere on its first
        torch.set_num_threads(threads)  # parallel op: do that first, then set this lane's
        started.wait()
        while (item := self._lane_queue.get()) is not None:
            fn, event, label, ran = item
            wall_start, start = time.time_ns(), time.perf_counter()
            failed = None
            try:
                fn()
            except BaseException as exc:
                failed = exc
            ran += (start, time.perf_counter())
            recorder = self.backend.recorder if self.backend is not None else None
            if failed is None and recorder is not None and label is not None:
                recorder.slice(self.lane_tracks[index], label, wall_start, time.time_ns())
            event.finish(failed)


def host_streams(backend, record_intervals: bool = False) -> tuple[CpuStream, CpuStream, CpuStream]:
    """A backend's three host worker streams: KV gathers into page-locked staging, KV scatters out of it, and
    decode attention over the host KV cache (`runtime.host_attention`)."""
    return (CpuStream("host KV gather", backend.counters, record_intervals, backend),
            CpuStream("host KV scatter", backend.counters, record_intervals, backend),
            CpuStream("host attention", backend.counters, record_intervals, backend))
