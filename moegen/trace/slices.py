"""What a trace is made of, without Perfetto: the label a work item carries, the slice it becomes,
and what a track's or a slice's name says (its stream, its module type).

The runtime labels work with these while any recorder is attached (a Perfetto file or the
planner's in-memory one), so importing this module must never need the perfetto package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Label:
    """What a stream work item is, for its slice: name, args, flows it starts and ends."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)  # layer, expert, tokens, bytes, flops, step, micro_batch
    flows_out: tuple[int, ...] = ()  # flows starting at this slice (a copy feeding a compute)
    flows_in: tuple[int, ...] = ()  # flows ending here


@dataclass(slots=True)
class Slice:
    """A recorded slice: on which track, what, when."""

    track: str  # the track's name ("compute stream lane 1", "event loop", ...)
    name: str
    start: int  # ns
    end: int  # ns
    args: dict = field(default_factory=dict)
    depth: int = 0  # nesting on its track (0: top level)
    flows_in: tuple[int, ...] = ()
    flows_out: tuple[int, ...] = ()


def stream_of(track: str) -> str:
    """The stream a track belongs to: "compute stream lane 2" -> "compute stream"."""
    return re.sub(r" lane \d+$", "", track)


HOST_ATTENTION_PARTS = ("project for ", "output of ")  # the device's share of a host-attended layer


def module_kind(name: str) -> str:
    """A compute slice's module type, as the planner names it: "expert[3][7]" -> "expert", "lm_head + sample" ->
    "lm_head", "host attention[2]" -> "host attention" (the host worker's), "project for host attention[2]" ->
    "attention" (its projections run on the device, counted with attention)."""
    if name.startswith(HOST_ATTENTION_PARTS):
        return "attention"
    if name.startswith("host attention["):
        return "host attention"
    return name.split("[")[0].split(" ")[0]


def group_members(args: dict) -> list[tuple[int, int]]:
    """(expert, tokens) of each member of a grouped expert launch, from its slice's `experts` arg ("e:tokens ...",
    written by `tasks.expert_groups`); [] for any other slice."""
    return [(int(e), int(n)) for e, n in (m.split(":") for m in str(args.get("experts", "")).split())]
