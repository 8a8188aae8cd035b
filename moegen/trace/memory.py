"""A recorder that keeps a run's trace in memory, as `Slice`s: no file, no Perfetto.

The planner's in-run calibration records its short runs with it (it runs on a user's first
`serve-offline`, tracing off, where the perfetto package may not be installed). It answers the
calls the runtime makes of a recorder (`TraceRecorder`'s: tracks, counter tracks, slices,
counters, flows, `enabled`, `steps`, `close`), from the loop thread and the stream workers alike.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict

from moegen.trace.slices import Label, Slice


class MemoryRecorder:
    """Thread-safe: slices and counter values appended under one lock, in the order recorded."""

    def __init__(self, steps: range | None = None):
        self.steps = steps  # record only these steps (None: all)
        self.enabled = True  # False outside `steps`
        self.tracks: dict[int, str] = {}  # uuid -> name, in creation order
        self.slices: list[Slice] = []
        self.counters: dict[str, list[tuple[int, float]]] = defaultdict(list)  # track name -> (ns, value)
        self._lock = threading.Lock()
        self._uuids = itertools.count(1)
        self._flows = itertools.count(1)

    def track(self, name: str) -> int:
        uuid = next(self._uuids)
        self.tracks[uuid] = name
        return uuid

    def counter_track(self, name: str, unit: str | None = None) -> int:
        return self.track(name)

    def new_flow(self) -> int:
        return next(self._flows)

    def slice(self, track: int, label: Label, start_ns: int, end_ns: int) -> None:
        if not self.enabled:
            return
        # One slice per call, never nested: the depth a parsed moegen trace file gives it too.
        done = Slice(self.tracks[track], label.name, start_ns, end_ns, dict(label.args), 0,
                     tuple(label.flows_in), tuple(label.flows_out))
        with self._lock:
            self.slices.append(done)

    def counter(self, track: int, value: float, ts_ns: int | None = None) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.counters[self.tracks[track]].append((ts_ns or time.time_ns(), float(value)))

    def close(self) -> None:
        """Nothing to flush: what was recorded stays readable."""
