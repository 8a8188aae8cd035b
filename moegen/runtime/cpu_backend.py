"""The cpu backend: each stream is a worker thread running submitted work in order, events are
thread-safe flags that also resolve asyncio futures (`worker_stream`); the compute stream has lanes
(`cpu_threads.cpu_lanes`).

The "device" is a separate, budgeted set of buffers in host memory: a module that isn't
resident is copied into a slot by the copy worker (a real memcpy, throttled to the simulated
link bandwidth when one is set), so offload and overlap are real code paths without a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from moegen.models.linear import can_pack, pack_linear
from moegen.runtime.backend import Backend, Counters, Event, Stream
from moegen.runtime.cpu_threads import cpu_lanes
from moegen.runtime.worker_stream import CpuEvent, CpuStream, host_streams


class CpuBackend(Backend):
    """Streams on threads; device buffers in host memory under a byte budget; an optional simulated link."""

    def __init__(self, budget: int | None = None, link_gbps: float | None = None, record_intervals: bool = False):
        self.name = "cpu"
        self.device = torch.device("cpu")
        self.counters = Counters()
        self.locked = []
        self.budget = budget
        self.link_gbps = link_gbps  # simulated host<->device bandwidth, GB/s (1e9 bytes); None = memcpy speed
        self.compute, self.h2d_weights, self.h2d_kv, self.d2h = (
            CpuStream(name, self.counters, record_intervals, self, lanes=cpu_lanes() if name == "compute" else 1)
            for name in ("compute", "copy H2D weights", "copy H2D KV", "copy D2H"))
        self.host_gather, self.host_scatter, self.host_attention = host_streams(self, record_intervals)

    async def wait(self, event: Event) -> None:
        await event.future()

    def place(self, t: Tensor, dtype: torch.dtype, what: str, fix: str | None = None) -> Tensor:
        """Counted against the budget, but not copied: this device's memory is host memory, and a
        weight that is only read can be read where it is (a second copy would double the host RAM)."""
        self.reserve(t.numel() * torch.empty((), dtype=dtype).element_size(), what, fix)
        return t.to(dtype)

    def place_linear(self, t: Tensor, dtype: torch.dtype, what: str, fix: str | None = None) -> Tensor:
        """Reordered once for oneDNN's matmul (models.linear), where it applies (float32)."""
        return pack_linear(self.place(t, dtype, what, fix))

    def packs_linears(self, dtype: torch.dtype) -> bool:
        return can_pack(self.device, dtype)

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
        for stream in self.streams:
            stream.cancel_pending()
        for stream in self.streams:
            stream.close()
        self.unlock_host()
