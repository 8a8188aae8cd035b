"""Stage 5, trace: the module run's trace (written by offload.module itself: nothing reruns),
copied into OUT, summarised by `moegen trace summarize --json`, and its clocks checked.

On cuda a slice's times are device events mapped onto the host clock (cuda_backend.DeviceClock);
every stream slice must lie within the traced steps' span (a second of slack), or the mapping is
off. A trace over MAX_BYTES would not come back from the GPU machine: the stage fails and says to
lower --trace-steps.

Record: `trace` (its path in OUT), `trace_bytes`, `steps` (traced step slices), `slices` (per stream
track), `misplaced` (stream slices outside the steps' span), `summary` (the summarize JSON).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tools.gpu_check.offload import TRACE
from tools.gpu_check.options import REPO, CheckOptions
from tools.gpu_check.stages import Outcome, Skip

MAX_BYTES = 15 * 2**20  # the device tool brings back files of at most 16 MiB
SLACK_NS = 10**9


def run(opts: CheckOptions, name: str) -> Outcome:
    source = opts.work / "offload" / TRACE
    if not source.is_file() or source.stat().st_size == 0:
        raise Skip(f"no trace at {source}: offload.module did not finish")
    size = source.stat().st_size
    if size > MAX_BYTES:
        return Outcome({"trace_bytes": size}, f"the trace is {size / 2**20:.1f} MiB, over the {MAX_BYTES / 2**20:.0f} "
                                              "MiB that comes back; lower --trace-steps")
    kept = opts.out / "offload-module.pftrace"
    shutil.copyfile(source, kept)
    done = subprocess.run([sys.executable, "-m", "moegen", "trace", "summarize", "--json", str(kept)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return Outcome({"trace": str(kept), "trace_bytes": size},
                       f"moegen trace summarize failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    summary = json.loads(done.stdout)
    steps, slices, misplaced = _placement(kept)
    streams = ", ".join(f"{k.replace(' stream', '')} {100 * v:.0f}%" for k, v in summary["streams"].items())
    numbers = {"trace": str(kept), "trace_bytes": size, "steps": steps, "slices": slices, "misplaced": misplaced,
               "summary": summary,
               "headline": f"{steps} steps, {size / 2**20:.2f} MiB; busy {streams}; overlap "
                           f"{100 * summary['overlap']:.0f}%, link {summary['link_gbps']:.1f} GB/s; bound: {summary['bound']}"}
    failures = []
    if not slices.get("compute stream") or not slices.get("copy H2D weights stream"):
        failures.append("no compute or weight-copy slices in the trace")
    if misplaced:
        failures.append(f"{misplaced} stream slices lie outside the traced steps: device clock misaligned")
    return Outcome(numbers, "; ".join(failures) or None)


def _placement(path) -> tuple[int, dict[str, int], int]:
    """(step slices, slices per stream track, stream slices outside the steps' span ± SLACK_NS)."""
    from moegen.trace.summarize import parse, stream_of

    parsed = parse(path)
    steps = [s for s in parsed.slices if s.track == "event loop"]
    if not steps:
        return 0, {}, 0
    first, last = min(s.start for s in steps) - SLACK_NS, max(s.end for s in steps) + SLACK_NS
    counts: dict[str, int] = {}
    misplaced = 0
    for s in parsed.slices:
        if stream_of(s.track).endswith("stream"):  # a lane's slices count as its stream's
            counts[stream_of(s.track)] = counts.get(stream_of(s.track), 0) + 1
            misplaced += not (first <= s.start <= s.end <= last)
    return len(steps), counts, misplaced
