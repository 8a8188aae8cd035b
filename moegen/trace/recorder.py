"""Record a Perfetto trace of a run: TrackEvent slices, flows and counters, streamed to the file.

One writer sequence for the whole trace: packets from the loop thread and the stream workers go
through one lock, event names are interned (each name's string is written once), and timestamps
are `time.time_ns()` on the REALTIME clock, with a clock snapshot so trace processors align them.
Nothing here runs when tracing is off: every caller holds `None` instead of a recorder (and the
planner's in-run calibration records in memory instead: `memory.MemoryRecorder`).
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

from moegen.trace.protos import BuiltinClock, StreamingTraceProtoBuilder, TracePacket, TrackDescriptor, TrackEvent
from moegen.trace.slices import Label

SEQUENCE = 0x6D6F65  # trusted_packet_sequence_id of every packet ("moe")
ROOT_UUID = 1


class TraceRecorder:
    """Thread-safe Perfetto writer. Tracks are created up front, in the order they should be shown."""

    def __init__(self, path: Path, steps: range | None = None):
        self.path = Path(path)
        self.steps = steps  # record only these steps (None: all)
        self._file = open(self.path, "wb")
        self._builder = StreamingTraceProtoBuilder(self._file)
        self._lock = threading.Lock()
        self._names: dict[str, int] = {}
        self._uuids = itertools.count(ROOT_UUID + 1)
        self._flows = itertools.count(1)
        self._order = itertools.count()
        self._first = True
        self.enabled = True  # False outside `steps`
        self._write_clock_snapshot()
        self._track(ROOT_UUID, "moegen", parent=None)

    def close(self) -> None:
        with self._lock:
            self._file.close()

    # -- tracks ---------------------------------------------------------------------------------

    def track(self, name: str) -> int:
        """A slice track under the root, shown in creation order."""
        uuid = next(self._uuids)
        self._track(uuid, name, parent=ROOT_UUID)
        return uuid

    def counter_track(self, name: str, unit: str | None = None) -> int:
        uuid = next(self._uuids)
        self._track(uuid, name, parent=ROOT_UUID, counter=True, unit=unit)
        return uuid

    def _track(self, uuid: int, name: str, parent: int | None, counter: bool = False, unit: str | None = None):
        packet = self._new_packet()
        desc = packet.track_descriptor
        desc.uuid = uuid
        desc.name = name
        if parent is None:
            desc.child_ordering = TrackDescriptor.ChildTracksOrdering.EXPLICIT
        else:
            desc.parent_uuid = parent
            desc.sibling_order_rank = next(self._order)
        if counter:
            desc.counter.SetInParent()
            if unit:
                desc.counter.unit_name = unit
        self._write(packet)

    # -- events ---------------------------------------------------------------------------------

    def new_flow(self) -> int:
        return next(self._flows)

    def slice(self, track: int, label: Label, start_ns: int, end_ns: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            begin = self._event_packet(track, start_ns, TrackEvent.TYPE_SLICE_BEGIN, label.name)
            for key, value in label.args.items():
                _annotate(begin.track_event.debug_annotations.add(), key, value)
            begin.track_event.flow_ids.extend(label.flows_out)
            begin.track_event.terminating_flow_ids.extend(label.flows_in)
            self._builder.write_packet(begin)
            self._builder.write_packet(self._event_packet(track, end_ns, TrackEvent.TYPE_SLICE_END, None))

    def counter(self, track: int, value: float, ts_ns: int | None = None) -> None:
        if not self.enabled:
            return
        with self._lock:
            packet = self._event_packet(track, ts_ns or time.time_ns(), TrackEvent.TYPE_COUNTER, None)
            packet.track_event.double_counter_value = float(value)
            self._builder.write_packet(packet)

    # -- packets --------------------------------------------------------------------------------

    def _event_packet(self, track: int, ts_ns: int, kind, name: str | None) -> TracePacket:
        packet = self._new_packet()
        packet.timestamp = ts_ns
        packet.timestamp_clock_id = BuiltinClock.BUILTIN_CLOCK_REALTIME
        event = packet.track_event
        event.type = kind
        event.track_uuid = track
        if name is not None:
            iid = self._names.get(name)
            if iid is None:
                iid = self._names[name] = len(self._names) + 1
                entry = packet.interned_data.event_names.add()
                entry.iid, entry.name = iid, name
            event.name_iid = iid
        return packet

    def _new_packet(self) -> TracePacket:
        packet = self._builder.create_packet()
        packet.trusted_packet_sequence_id = SEQUENCE
        if self._first:
            packet.sequence_flags = TracePacket.SEQ_INCREMENTAL_STATE_CLEARED
            self._first = False
        else:
            packet.sequence_flags = TracePacket.SEQ_NEEDS_INCREMENTAL_STATE
        return packet

    def _write(self, packet: TracePacket) -> None:
        with self._lock:
            self._builder.write_packet(packet)

    def _write_clock_snapshot(self) -> None:
        packet = self._builder.create_packet()
        snapshot = packet.clock_snapshot
        for clock_id, value in ((BuiltinClock.BUILTIN_CLOCK_BOOTTIME, time.clock_gettime_ns(time.CLOCK_BOOTTIME)),
                                (BuiltinClock.BUILTIN_CLOCK_REALTIME, time.time_ns())):
            clock = snapshot.clocks.add()
            clock.clock_id, clock.timestamp = clock_id, value
        snapshot.primary_trace_clock = BuiltinClock.BUILTIN_CLOCK_BOOTTIME
        self._write(packet)


def _annotate(annotation, key: str, value: Any) -> None:
    annotation.name = key
    if isinstance(value, bool):
        annotation.bool_value = value
    elif isinstance(value, int):
        annotation.int_value = value
    elif isinstance(value, float):
        annotation.double_value = value
    else:
        annotation.string_value = str(value)
