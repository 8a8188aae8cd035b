"""The Perfetto protos moegen writes and reads, imported in this one place.

Only tracing needs them (`--trace`, `moegen trace summarize`, `moegen bench`); a run with tracing
off never imports this module. Where the perfetto or protobuf package is missing, importing it
fails with the one error that says what to install.
"""

from __future__ import annotations

FIX = "pip install perfetto protobuf"

try:
    from google.protobuf.message import DecodeError
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import (
        BuiltinClock,
        Trace,
        TracePacket,
        TrackDescriptor,
        TrackEvent,
    )
    from perfetto.trace_builder.proto_builder import StreamingTraceProtoBuilder
except ImportError as exc:
    raise ImportError(f"Perfetto traces need the perfetto and protobuf packages, and this Python can't import "
                      f"them ({exc}); install them ({FIX}), or run without tracing") from exc

__all__ = ["BuiltinClock", "DecodeError", "StreamingTraceProtoBuilder", "Trace", "TracePacket", "TrackDescriptor",
           "TrackEvent"]
