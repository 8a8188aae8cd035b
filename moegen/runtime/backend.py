"""The one small interface the runtime sees of a device: streams, events, device buffers, copies.

A stream runs submitted work in order; an event marks a point in a stream. Other streams wait on
events (the device orders the work: the host never blocks on a copy); the host awaits an event
only for data it must read (router counts, sampled ids). Device buffers are allocated through
the backend, which holds them to the `--gpu-memory` budget and records the high-water mark.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moegen.units import format_bytes


def resolve_future(fut: asyncio.Future, error: BaseException | None) -> None:
    """Complete `fut` with None or `error` (called on the loop's thread, via call_soon_threadsafe)."""
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class DeviceBudgetError(RuntimeError):
    """The device budget can't hold what the run needs; says which knob to change."""


@dataclass(slots=True)
class Counters:
    """What crossed the link and what the device held; read by tests, traces and stats."""

    h2d_bytes: int = 0  # host -> device
    d2h_bytes: int = 0  # device -> host
    h2d_copies: int = 0
    h2d_weight_bytes: int = 0  # the part of h2d_bytes that was module weights streamed into slots
    device_bytes: int = 0  # allocated now
    device_high_water: int = 0  # most ever allocated at once
    busy_s: dict[str, float] = field(default_factory=dict)  # per stream: seconds spent running work


class Event(ABC):
    """A point in a stream's work. `done()` never blocks."""

    @abstractmethod
    def done(self) -> bool: ...

    @abstractmethod
    def block(self) -> None:
        """Block the calling thread until the work before the event has ended (a host worker's wait, never
        the event loop's); re-raises its error."""


class Stream(ABC):
    """Runs submitted work in submission order."""

    name: str
    lanes: int = 1  # items that may run side by side (the cpu compute stream's lanes)
    lane_tracks: list[int]  # trace track uuid of each lane, when lanes > 1

    @abstractmethod
    def submit(self, fn: Callable[[], object], label=None, concurrent: bool = False) -> Event:
        """Queue `fn` (a whole module launch or copy, never a single op); the event marks its end.
        `label` (a trace Label) names its slice when a trace is being recorded. `concurrent`: `fn`
        commutes with the concurrent items submitted right before and after it, which may then run
        side by side where the stream has lanes (elsewhere the flag changes nothing)."""

    @abstractmethod
    def wait_event(self, event: Event) -> None:
        """Work submitted after this starts only once `event` has completed (device-side wait)."""


class Backend(ABC):
    """A device: a compute stream, a weights copy stream, a KV copy stream, a device-to-host stream; and
    three host worker streams, worker threads on every backend: the host's side of KV staging (gathers into
    page-locked buffers, scatters out of them) and decode attention over the host KV cache."""

    name: str
    device: torch.device  # where device buffers live
    counters: Counters
    budget: int | None  # device bytes allowed, None = unlimited

    compute: Stream
    h2d_weights: Stream
    h2d_kv: Stream
    d2h: Stream
    host_gather: Stream
    host_scatter: Stream
    host_attention: Stream  # decode attention over the host KV cache (`runtime.host_attention`)
    recorder = None  # a TraceRecorder while tracing
    locked: list[tuple[Tensor, int, str]]  # host buffers page-locked by `lock_host`: (buffer, bytes, what)

    @property
    def streams(self) -> tuple[Stream, ...]:
        return (self.compute, self.h2d_weights, self.h2d_kv, self.d2h, *self.host_workers)

    @property
    def host_workers(self) -> tuple[Stream, ...]:
        """The worker-thread streams that run host work on every backend."""
        return (self.host_gather, self.host_scatter, self.host_attention)

    def trace_to(self, recorder) -> None:
        """Record every labelled work item as a slice on its stream's track (in this order)."""
        self.recorder = recorder
        for stream in self.streams:
            stream.track = recorder.track(f"{stream.name} stream")
            if stream.lanes > 1:
                stream.lane_tracks = [recorder.track(f"{stream.name} stream lane {i + 1}") for i in range(stream.lanes)]

    def write_timings(self) -> None:
        """Write the trace slices of work whose device timings are in (cuda; the cpu backend's workers
        write theirs as they finish)."""

    @abstractmethod
    async def wait(self, event: Event) -> None:
        """Resolve when `event` completes, without blocking the event loop; re-raises its error."""

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> Tensor:
        """A large host buffer the device copies from and to, at exactly its size, page-locked by one
        `lock_host` until the backend closes. (torch's pinned allocator, `pin_memory=True`, rounds every
        request up to a power of two: a 48.7 GiB weight arena would take 64 GiB of locked memory.)"""
        buffer = torch.empty(shape, dtype=dtype)
        self.lock_host(buffer, what)
        return buffer

    def lock_host(self, buffer: Tensor, what: str) -> None:
        """Page-lock the whole of `buffer`'s memory (a fresh `host_buffer`, or an arena an earlier engine
        packed and this one reuses) for asynchronous copies, until `close`; `what` names it in errors."""
        nbytes = buffer.numel() * buffer.element_size()
        if nbytes:
            self._page_lock(buffer, nbytes, what)
            self.locked.append((buffer, nbytes, what))

    def unlock_host(self) -> None:
        """Release every page-lock `lock_host` took (at close: the memory itself goes with its last user)."""
        while self.locked:
            buffer, _, _ = self.locked.pop()
            self._page_unlock(buffer)

    def _page_lock(self, buffer: Tensor, nbytes: int, what: str) -> None:
        """Register `nbytes` at `buffer` with the device driver (nothing to do where there is no device DMA)."""

    def _page_unlock(self, buffer: Tensor) -> None:
        """Undo `_page_lock`."""

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype, what: str, fix: str | None = None) -> Tensor:
        """A device buffer, counted against the budget; `what` names it in the error, `fix` says what helps."""
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        self.reserve(nbytes, what, fix)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def place(self, t: Tensor, dtype: torch.dtype, what: str, fix: str | None = None) -> Tensor:
        """Host tensor `t` as a device tensor of `dtype` that is never written (resident weights),
        counted against the budget like `alloc`."""
        dev = self.alloc(tuple(t.shape), dtype, what, fix)
        dev.copy_(t)
        return dev

    def place_linear(self, t: Tensor, dtype: torch.dtype, what: str, fix: str | None = None) -> Tensor:
        """`place` for a weight only ever used as the W of x Wᵀ (models.linear.linear)."""
        return self.place(t, dtype, what, fix)

    def packs_linears(self, dtype: torch.dtype) -> bool:
        """Whether `place_linear` stores weights of `dtype` in another layout than `place` (so a
        resident module placed with it can't be a view of its host block)."""
        return False

    def reserve(self, nbytes: int, what: str, fix: str | None = None) -> None:
        c = self.counters
        if self.budget is not None and c.device_bytes + nbytes > self.budget:
            raise DeviceBudgetError(
                f"device memory budget --gpu-memory {format_bytes(self.budget)} can't hold {what} "
                f"({nbytes / 2**20:.1f} MiB more on top of {c.device_bytes / 2**20:.1f} MiB already placed); "
                + (fix or "raise --gpu-memory or lower --batch-size / --attn-micro-batch / --expert-slots")
            )
        c.device_bytes += nbytes
        c.device_high_water = max(c.device_high_water, c.device_bytes)

    def copy(self, stream: Stream, dst: Tensor, src: Tensor, label=None) -> Event:
        """dst.copy_(src) on `stream` (non_blocking), counted by direction."""
        return self.submit_copy(stream, lambda: dst.copy_(src, non_blocking=True), src.numel() * src.element_size(),
                                label)

    @abstractmethod
    def submit_copy(self, stream: Stream, fn: Callable[[], object], nbytes: int, label=None) -> Event:
        """Run copy work `fn` moving `nbytes` on `stream`; counted, and paced by a simulated link if any."""

    def _count_copy(self, stream: Stream, nbytes: int) -> None:
        if stream is self.d2h:
            self.counters.d2h_bytes += nbytes
        else:
            self.counters.h2d_bytes += nbytes
            self.counters.h2d_copies += 1
            if stream is self.h2d_weights:
                self.counters.h2d_weight_bytes += nbytes

    def synchronize(self) -> None:
        """Block until all work issued so far is done (start-up only, never on the hot path)."""

    @abstractmethod
    def close(self) -> None:
        """Stop the backend's threads; pending work is dropped."""
