"""`moegen trace summarize`: what the streams did, computed from a trace file alone.

Reads any TrackEvent trace with the layout moegen writes (tracks named "... stream", slices with
`bytes`/`flops` args, a loop track with step slices): wall time, each stream's busy fraction,
copy/compute overlap, compute bubbles inside steps, time per module type, achieved link GB/s and
compute FLOP/s, and which resource bounded the run. A stream's lanes ("compute stream lane 1", ...:
launches running side by side) count as that stream: busy while any of its tracks is, and a module
type's time is the time any of its launches ran.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from moegen.intervals import intersect, length, union
from moegen.trace.protos import DecodeError, Trace, TrackEvent
from moegen.trace.slices import Slice, group_members, module_kind, stream_of


class TraceFileError(ValueError):
    """The file is not a trace this tool can read."""


@dataclass(slots=True)
class ParsedTrace:
    tracks: dict[int, str]  # uuid -> name
    slices: list[Slice]
    counters: dict[str, list[tuple[int, float]]]  # track name -> (ts, value)


def parse(path: Path) -> ParsedTrace:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TraceFileError(f"{path}: can't read it ({exc.strerror}); pass the file a --trace run wrote") from exc
    if not data:
        raise TraceFileError(f"{path}: empty file (the run was not traced, or did not finish); pass the file a "
                             "finished --trace run wrote")
    try:
        trace = Trace.FromString(data)
    except DecodeError as exc:
        raise TraceFileError(f"{path}: not a Perfetto protobuf trace ({exc}); pass the file a --trace run "
                             "wrote") from exc
    tracks, names, counter_tracks = {}, {}, set()
    open_slices: dict[int, list[Slice]] = defaultdict(list)
    parsed = ParsedTrace(tracks, [], defaultdict(list))
    for packet in trace.packet:
        if packet.HasField("track_descriptor"):
            desc = packet.track_descriptor
            tracks[desc.uuid] = desc.name
            if desc.HasField("counter"):
                counter_tracks.add(desc.uuid)
        for entry in packet.interned_data.event_names:
            names[entry.iid] = entry.name
        if not packet.HasField("track_event"):
            continue
        event, ts = packet.track_event, packet.timestamp
        track = tracks.get(event.track_uuid, str(event.track_uuid))
        if event.type == TrackEvent.TYPE_SLICE_BEGIN:
            stack = open_slices[event.track_uuid]
            stack.append(Slice(track, event.name or names.get(event.name_iid, "?"), ts, ts, _args(event), len(stack),
                               tuple(event.terminating_flow_ids), tuple(event.flow_ids)))
        elif event.type == TrackEvent.TYPE_SLICE_END:
            stack = open_slices[event.track_uuid]
            if not stack:
                raise TraceFileError(f"{path}: a slice ends on track {track!r} that never began; the trace is "
                                     "damaged, record it again with --trace")
            done = stack.pop()
            done.end = ts
            parsed.slices.append(done)
        elif event.type == TrackEvent.TYPE_COUNTER:
            parsed.counters[track].append((ts, event.double_counter_value or float(event.counter_value)))
    if not parsed.slices:
        raise TraceFileError(f"{path}: holds no slices, nothing was recorded; trace again with a --trace-steps "
                             "range the run reaches, or without --trace-steps")
    return parsed


def _args(event) -> dict:
    out = {}
    for a in event.debug_annotations:
        for kind in ("int_value", "double_value", "string_value", "bool_value"):
            if a.HasField(kind):
                out[a.name] = getattr(a, kind)
    return out


def summarize(path: Path) -> dict:
    """The summary as a dict with keys wall_s, streams, overlap, bubbles, modules, link_gbps, flops, bound."""
    t = parse(path)
    first, last = min(s.start for s in t.slices), max(s.end for s in t.slices)
    wall = max(last - first, 1)
    top = [s for s in t.slices if s.depth == 0]
    busy = {name: union([(s.start, s.end) for s in top if stream_of(s.track) == name])
            for name in sorted({stream_of(s.track) for s in top if "stream" in s.track})}
    compute = next((v for k, v in busy.items() if "compute" in k), [])
    copies = union([iv for k, v in busy.items() if "copy" in k for iv in v])
    h2d = union([iv for k, v in busy.items() if "copy" in k and "H2D" in k for iv in v])
    either = union(compute + copies)
    overlap = length(intersect(compute, copies)) / max(length(either), 1)
    fractions = {k: length(v) / wall for k, v in busy.items()}
    copy_bytes = sum(s.args.get("bytes", 0) for s in top if "copy" in s.track and "H2D" in s.track)
    flops = sum(s.args.get("flops", 0) for s in top if "compute" in s.track)
    compute_s = length(compute) / 1e9
    link_gbps = copy_bytes / max(length(h2d) / 1e9, 1e-12) / 1e9 if copy_bytes else 0.0
    return {
        "wall_s": wall / 1e9,
        "streams": fractions,
        "overlap": overlap,
        "bubbles": _bubbles(t, compute),
        "modules": _modules(top, wall),
        "experts": _experts(top),
        "link_gbps": link_gbps,
        "flops": flops / compute_s if compute_s else 0.0,
        "bound": _bound(fractions),
        "plan": _versus_plan(t),
    }


def _bubbles(t: ParsedTrace, compute: list[tuple[int, int]]) -> dict:
    """Compute idle inside steps (work was pending: the step was not done), with what ended each gap."""
    steps = union([(s.start, s.end) for s in t.slices if s.track == "event loop"])
    gaps = []
    for (_, end), (nxt, _) in zip(compute, compute[1:]):
        for inside in intersect([(end, nxt)], steps):
            gaps.append(inside)
    starts = {s.start: s for s in t.slices if "compute" in s.track and s.depth == 0}
    largest = sorted(gaps, key=lambda g: g[0] - g[1])[:10]
    return {
        "total_s": length(gaps) / 1e9,
        "count": len(gaps),
        "largest": [{"s": (e - s) / 1e9, "before": _next_name(starts, e)} for s, e in largest],
    }


def _next_name(starts: dict, ts: int) -> str:
    later = [k for k in starts if k >= ts]
    return starts[min(later)].name if later else "?"


def _modules(top: list[Slice], wall: int) -> dict:
    """Compute time per module type (attention, router, expert, mlp, combine, embed, lm_head, and host attention
    on its host worker): the time any of its launches ran (launches side by side on lanes count once)."""
    out: dict[str, dict] = {}
    intervals: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for s in top:
        if not _computes(s.track):
            continue
        kind = module_kind(s.name)
        entry = out.setdefault(kind, {"s": 0.0, "launches": 0, "tokens": 0, "flops": 0})
        intervals[kind].append((s.start, s.end))
        entry["launches"] += 1
        entry["tokens"] += int(s.args.get("tokens", 0))
        entry["flops"] += int(s.args.get("flops", 0))
    for kind, entry in out.items():
        entry["s"] = length(union(intervals[kind])) / 1e9
        entry["share_of_wall"] = entry["s"] * 1e9 / wall
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["s"]))


def _computes(track: str) -> bool:
    """A track whose slices are module compute: the compute stream and its lanes, the host attention worker."""
    return "compute" in track or track.startswith("host attention")


def _experts(top: list[Slice]) -> dict[str, dict]:
    """Compute time and tokens per routed expert ("expert[l][e]"): its own launches, plus its share of each
    grouped launch it was in ("expert[l] group", args `experts` "e:tokens ..."), in proportion to its tokens
    (the members of a layer are the same size)."""
    out: dict[str, dict] = {}

    def add(name: str, seconds: float, tokens: int) -> None:
        entry = out.setdefault(name, {"s": 0.0, "tokens": 0, "launches": 0})
        entry["s"] += seconds
        entry["tokens"] += tokens
        entry["launches"] += 1

    for s in top:
        if "compute" not in s.track or module_kind(s.name) != "expert":
            continue
        seconds = (s.end - s.start) / 1e9
        counts = group_members(s.args)
        if not counts:
            add(s.name, seconds, int(s.args.get("tokens", 0)))
            continue
        total = sum(n for _, n in counts) or 1
        for e, n in counts:
            add(f"expert[{s.args.get('layer')}][{e}]", seconds * n / total, n)
    return out


def _versus_plan(t: ParsedTrace) -> dict | None:
    """Measured against the plan recorded in the trace (None if none): the full decode steps' time and
    compute seconds per module type per step, and the prefill steps' tokens/s."""
    plan = next((s.args for s in t.slices if s.track == "plan"), None)
    if plan is None:
        return None
    steps = [s for s in t.slices if s.track == "event loop"]
    full = [s for s in steps if s.args.get("phase") == "decode"
            and int(s.args.get("sequences", 0)) == int(plan.get("decode_sequences", -1))]
    prefill = [s for s in steps if s.args.get("phase") == "prefill"]
    out: dict = {"decode_steps": len(full), "prefill_steps": len(prefill), "modules": {}}
    if full:
        step_s = sum(s.end - s.start for s in full) / len(full) / 1e9
        out["decode_step_s"] = {"predicted": plan["decode_step_s"], "measured": step_s}
        out["decode_tok_s"] = {"predicted": plan["decode_tok_s"], "measured": int(plan["decode_sequences"]) / step_s}
        windows = [(s.start, s.end) for s in full]
        per_kind: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for sl in t.slices:
            if _computes(sl.track) and sl.depth == 0 and any(a <= sl.start < b for a, b in windows):
                per_kind[module_kind(sl.name)].append((sl.start, sl.end))
        for key, predicted in plan.items():
            if key.startswith("decode ") and key.endswith("_s"):
                kind = key[len("decode "): -2]
                measured = length(union(per_kind.get(kind, []))) / 1e9 / len(full)
                out["modules"][kind] = {"predicted": predicted, "measured": measured}
    if prefill:
        tokens = sum(int(s.args.get("prefill_tokens", 0)) for s in prefill)
        out["prefill_tok_s"] = {"predicted": plan["prefill_tok_s"],
                                "measured": tokens / (sum(s.end - s.start for s in prefill) / 1e9)}
    return out


def _bound(fractions: dict[str, float]) -> str:
    compute = max((v for k, v in fractions.items() if "compute" in k), default=0.0)
    link = max((v for k, v in fractions.items() if "copy" in k and "H2D" in k), default=0.0)
    if max(compute, link) < 0.5:
        return "host: the streams were idle most of the time (Python/scheduling overhead or host syncs)"
    return "link: host->device copies" if link > compute else "compute"


def format_summary(s: dict) -> str:
    lines = [f"wall {s['wall_s']:.3f}s; bound by {s['bound']}",
             f"copy/compute overlap {s['overlap']:.1%} (time both busy / time either busy)"]
    lines += [f"  {name:<28} busy {frac:6.1%}" for name, frac in s["streams"].items()]
    b = s["bubbles"]
    lines.append(f"compute bubbles inside steps: {b['count']} totalling {b['total_s']:.3f}s")
    lines += [f"  {g['s'] * 1e3:8.2f} ms before {g['before']}" for g in b["largest"][:5]]
    lines.append(f"link {s['link_gbps']:.2f} GB/s while copying; compute {s['flops'] / 1e9:.1f} GFLOP/s while busy")
    if s.get("plan"):
        lines += _format_plan(s["plan"])
    lines.append("modules (compute time):")
    lines += [f"  {k:<16} {v['s']:8.3f}s {v['share_of_wall']:6.1%} of wall, {v['launches']} launches, "
              f"{v['tokens']} tokens" for k, v in s["modules"].items()]
    if s.get("experts"):
        lines += _format_experts(s["experts"])
    return "\n".join(lines)


def _format_plan(v: dict) -> list[str]:
    def cmp(name: str, pair: dict, unit: str = "", scale: float = 1.0) -> str:
        ratio = pair["measured"] / pair["predicted"] if pair["predicted"] else float("inf")
        return (f"  {name:<24} predicted {pair['predicted'] * scale:10.2f}{unit}  measured "
                f"{pair['measured'] * scale:10.2f}{unit}  ({ratio:.2f}x)")

    lines = [f"against the plan ({v['decode_steps']} full decode steps, {v['prefill_steps']} prefill steps):"]
    for key, unit, scale in (("decode_tok_s", " tok/s", 1.0), ("decode_step_s", " ms", 1e3),
                             ("prefill_tok_s", " tok/s", 1.0)):
        if key in v:
            lines.append(cmp(key.replace("_", " "), v[key], unit, scale))
    for kind, pair in v["modules"].items():
        lines.append(cmp(f"{kind} per decode step", pair, " ms", 1e3))
    return lines


def _format_experts(experts: dict[str, dict]) -> list[str]:
    """Time per routed expert (a grouped launch's time shared by tokens): spread, and the five that took most."""
    ranked = sorted(experts.items(), key=lambda kv: -kv[1]["s"])
    times = [v["s"] for _, v in ranked]
    lines = [f"experts (compute time each, a group's shared by tokens): {len(times)} experts, mean "
             f"{sum(times) / len(times) * 1e3:.2f} ms, min {times[-1] * 1e3:.2f} ms, max {times[0] * 1e3:.2f} ms"]
    lines += [f"  {name:<16} {v['s'] * 1e3:8.2f} ms, {v['tokens']} tokens" for name, v in ranked[:5]]
    return lines
