"""The cuda backend: torch streams and events; pinned host memory; device buffers under a budget.

Submitting work enqueues its kernels on the stream from the event loop's thread (a launch is
asynchronous) and records an event after them. Streams wait on each other's events on the GPU;
the host waits only through a waiter thread that synchronizes on an event and resolves the
asyncio future with `call_soon_threadsafe`, so the loop keeps scheduling other modules meanwhile.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from moegen.runtime.backend import Backend, Counters, Event, Stream, resolve_future


class CudaEvent(Event):
    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def done(self) -> bool:
        return self.event.query()


class CudaStream(Stream):
    def __init__(self, name: str, device: torch.device):
        self.name = name
        self.track = 0  # trace track uuid (device-side timing events are not recorded yet)
        self.stream = torch.cuda.Stream(device=device)

    def submit(self, fn: Callable[[], object], label=None) -> CudaEvent:
        with torch.cuda.stream(self.stream):
            fn()
            event = torch.cuda.Event()
            event.record(self.stream)
        return CudaEvent(event)

    def wait_event(self, event: Event) -> None:
        self.stream.wait_event(event.event)


class CudaBackend(Backend):
    """One GPU. `budget` defaults to the device's free memory less a 1 GiB margin for kernels' workspaces."""

    MARGIN = 2**30

    def __init__(self, budget: int | None = None, index: int = 0):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device here; use --device cpu")
        self.name = "cuda"
        self.device = torch.device("cuda", index)
        self.counters = Counters()
        free, _total = torch.cuda.mem_get_info(self.device)
        self.budget = budget if budget is not None else max(0, free - self.MARGIN)
        self.compute, self.h2d_weights, self.h2d_kv, self.d2h = (
            CudaStream(name, self.device) for name in ("compute", "copy H2D weights", "copy H2D KV", "copy D2H"))
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
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waits.put((event, loop, fut))
        await fut

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def submit_copy(self, stream: Stream, fn: Callable[[], object], nbytes: int, label=None) -> CudaEvent:
        self._count_copy(stream, nbytes)
        return stream.submit(fn, label)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self._waits.put(None)
        self._waiter.join()
        torch.cuda.synchronize(self.device)


