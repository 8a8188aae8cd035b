"""The stages, in order of value, and what one stage process does: run its stage, write its record.

    python -m tools.gpu_check.stages NAME OPTIONS_JSON     (the runner spawns this; never by hand)

A stage's `run(opts, name)` returns an Outcome (its numbers, and why it failed if a check did not
hold), raises Skip when its inputs are missing, or raises anything else (recorded as failed). The
process appends the record itself as it ends; the runner writes one only for a process that died
without (killed at its timeout, or crashed).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from tools.gpu_check import records
from tools.gpu_check.options import CheckOptions


@dataclass(frozen=True, slots=True)
class Stage:
    number: str  # "1".."6"; a part of stage 4 is "4.1".."4.3"
    name: str  # the record's "stage"
    module: str  # tools.gpu_check.<module>.run(opts, name) runs it
    timeout_s: float  # its budget on the GPU, seconds (a part's: its share of the stage's)
    dry_timeout_s: float  # with --dry-run


@dataclass(frozen=True, slots=True)
class StageGroup:
    """A stage run as several processes (stage 4: write the checkpoint once, then one run per mode)."""

    number: str
    name: str
    parts: tuple[Stage, ...]


STAGES: tuple[Stage | StageGroup, ...] = (
    Stage("1", "preflight", "preflight", 45, 30),  # a fresh machine's first torch import reads a cold disk
    Stage("2", "bandwidth", "bandwidth", 35, 30),
    Stage("3", "parity", "parity", 100, 90),
    StageGroup("4", "offload", (
        Stage("4.1", "offload.write", "mixtral_shaped", 75, 30),
        Stage("4.2", "offload.module", "offload", 100, 40),
        Stage("4.3", "offload.model", "offload", 75, 40),
    )),
    Stage("5", "trace", "trace", 40, 30),
    Stage("6", "fp8", "fp8", 40, 30),  # two expert shapes, three token counts: ~10 s of GPU work after start-up
)


def resolve(spec: str) -> tuple[str, ...]:
    """--stages "1,2,offload" -> the stage and part names to run, in stage order."""
    wanted = {s.strip() for s in spec.split(",") if s.strip()}
    names, known = [], set()
    for stage in STAGES:
        parts = stage.parts if isinstance(stage, StageGroup) else (stage,)
        whole = "all" in wanted or stage.number in wanted or stage.name in wanted
        for part in parts:
            known |= {part.number, part.name}
            if whole or part.number in wanted or part.name in wanted:
                names.append(part.name)
        known |= {stage.number, stage.name}
    unknown = wanted - known - {"all"}
    if unknown:
        raise ValueError(f"--stages: unknown {', '.join(sorted(unknown))}; give names or numbers from: "
                         + ", ".join(f"{n} {s}" for n, s in sorted(_numbered().items())))
    return tuple(names)


def by_name(name: str) -> Stage:
    for stage in STAGES:
        for part in stage.parts if isinstance(stage, StageGroup) else (stage,):
            if part.name == name:
                return part
    raise KeyError(f"no stage named {name!r}")


def stage_timeout(opts: CheckOptions, stage: Stage) -> float:
    """A stage's budget, seconds: --timeout's (by name or number), else its default."""
    default = stage.dry_timeout_s if opts.dry_run else stage.timeout_s
    return opts.timeouts.get(stage.name, opts.timeouts.get(stage.number, default))


def _numbered() -> dict[str, str]:
    out = {}
    for stage in STAGES:
        out[stage.number] = stage.name
        if isinstance(stage, StageGroup):
            out |= {p.number: p.name for p in stage.parts}
    return out


@dataclass(slots=True)
class Outcome:
    numbers: dict = field(default_factory=dict)  # the record's payload (JSON-ready), "headline" included
    failure: str | None = None  # a check that did not hold, though the stage ran to its end


class Skip(Exception):
    """The stage's inputs are missing (an earlier stage failed or was not run): recorded as skipped."""


def run_one(opts: CheckOptions, name: str) -> dict:
    """Run stage `name` in this process; return (and append) its record."""
    started = time.perf_counter()
    numbers: dict = {}
    try:
        if name in opts.force_hang:
            print(f"{name}: --force-hang: sleeping until killed", flush=True)
            time.sleep(10**6)
        if name in opts.force_fail:
            raise RuntimeError(f"forced failure (--force-fail {name})")
        module = importlib.import_module(f"tools.gpu_check.{by_name(name).module}")
        outcome: Outcome = module.run(opts, name)
        numbers = outcome.numbers
        status = "ok" if outcome.failure is None else "failed"
        extra = {} if outcome.failure is None else {"error": outcome.failure}
    except Skip as why:
        status, extra = "skipped", {"reason": str(why)}
    except Exception as exc:  # recorded, never lost: the next stage runs regardless
        traceback.print_exc()
        status, extra = "failed", {"error": f"{type(exc).__name__}: {exc}"}
    record = records.base(opts, name, status, time.perf_counter() - started) | extra | numbers
    records.append(opts, record)
    print(f"{name}: {status}" + (f": {extra.get('error') or extra.get('reason')}" if extra else ""), flush=True)
    return record


if __name__ == "__main__":
    # Through the package's own module: a stage raises that module's Skip, not this __main__ copy's.
    from tools.gpu_check import stages

    stages.run_one(CheckOptions.load(Path(sys.argv[2])), sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # the record is written: skip the interpreter's teardown of torch (and of CUDA, which can hang)
