"""The check's options: one dataclass, parsed once by the runner and handed to every stage process
as a JSON file (so a stage sees exactly what the runner saw)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moegen.units import parse_bytes

REPO = Path(__file__).resolve().parents[2]


@dataclass(slots=True)
class CheckOptions:
    device: Literal["cuda", "cpu"] = "cuda"
    """Backend every stage runs on."""
    dry_run: bool = False
    """Toy sizes (tiny checkpoints, a small Mixtral-shaped model, small buffers), for checking the
    script itself on a cpu."""
    stages: tuple[str, ...] = ()
    """Names of the stages and stage parts to run, in run order (resolved from --stages)."""
    timeouts: dict[str, float] = field(default_factory=dict)
    """Seconds per stage or part name, overriding the defaults (--timeout NAME=SECONDS)."""
    out: Path = Path()
    """Where records.jsonl, gpu_check.log and the trace go ($OUT on the GPU machine)."""
    work: Path = Path()
    """Scratch that outlives a call (the Mixtral-shaped checkpoint, its plan, the module run's trace,
    every record so far): a rerun of one stage finds what earlier stages left."""
    prepared: Path = REPO / ".gpu_check"
    """What `--prepare` built on the CPU: tiny checkpoints and their expected tokens and logits."""
    trace_steps: int = 4
    """Decode steps of the module run recorded in the one trace (keeps the file small)."""
    gpu_memory: int | None = None
    """Stage 4's device budget, bytes; None = 14 GiB (dry run: 12 MiB), at most 35% of the weights."""
    weights: int | None = None
    """Stage 4's target bytes of bfloat16 weights; None = 40 GiB (dry run: 48 MiB). Memory, disk and
    time caps may write fewer layers."""
    batch: int | None = None
    """Stage 4's B (sequences in flight); None = twice what model-based batching fits on the device."""
    prompt: int = 512
    """Stage 4's prompt tokens per sequence."""
    decode: int = 32
    """Stage 4's generated tokens per sequence."""
    fallback_link_gbps: float = 25.0
    """Host->device GB/s that sizes stage 4 when no bandwidth record exists (stage 2 failed)."""
    sim_link_gbps: float = 1.0
    """--device cpu: the simulated link's GB/s in stage 4."""
    write_gbps: float = 1.5
    """Assumed rate of writing the checkpoint (random bytes to disk, synced), for planning its size;
    the writer then measures its own rate and stops early if it is slower."""
    load_gbps: float = 3.0
    """Assumed rate of loading it into pinned host memory, for planning."""
    deadline_s: float = 510.0
    """The whole check's seconds: a stage's timeout is cut to what is left of it."""
    force_fail: tuple[str, ...] = ()
    """Stage names that raise at their start (testing the runner)."""
    force_hang: tuple[str, ...] = ()
    """Stage names that sleep until killed (testing the runner)."""
    run_id: str = ""
    """Tags every record of one invocation (records of earlier ones stay in the work dir's history)."""

    @property
    def dtype(self) -> str:
        """Stage 4's runtime dtype."""
        return "bfloat16"

    def save(self, path: Path) -> None:
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        path.write_text(json.dumps(raw, default=str, indent=1))

    @classmethod
    def load(cls, path: Path) -> CheckOptions:
        raw = json.loads(Path(path).read_text())
        for name in ("out", "work", "prepared"):
            raw[name] = Path(raw[name])
        for name in ("stages", "force_fail", "force_hang"):
            raw[name] = tuple(raw[name])
        return cls(**raw)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bash tools/gpu_check.sh", description=(
        "One GPU check in one command: preflight, bandwidth, parity, offload, trace, fp8. Each stage runs in "
        "its own process under its own timeout and appends one JSON record to OUT/records.jsonl."))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dry-run", action="store_true", help="toy sizes: check the script on a cpu")
    p.add_argument("--stages", default="all", help="comma-separated names or numbers (1-6, offload.write "
                   "or 4.1 for one part of stage 4); default all")
    p.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS",
                   help="a stage's (or part's) time budget; repeatable")
    p.add_argument("--out", type=Path, help="default $OUT, else benchmarks/results/gpu_check-DEVICE[-dry]/")
    p.add_argument("--work", type=Path, help="default /tmp/moegen-gpu-check-DEVICE[-dry]")
    p.add_argument("--prepared", type=Path, default=REPO / ".gpu_check")
    p.add_argument("--prepare", action="store_true", help="build the prepared parity data (on the CPU, "
                   "before a GPU session) and exit")
    p.add_argument("--trace-steps", type=int, help="decode steps in the trace (default 4; dry run 2)")
    p.add_argument("--gpu-memory", type=parse_bytes, help="stage 4's device budget (e.g. 14GiB)")
    p.add_argument("--weights", type=parse_bytes, help="stage 4's target weight bytes (e.g. 40GiB)")
    p.add_argument("--batch", type=int, help="stage 4's B; default twice what model batching fits")
    p.add_argument("--prompt", type=int, help="stage 4's prompt tokens (default 512; dry run 32)")
    p.add_argument("--decode", type=int, help="stage 4's new tokens (default 32; dry run 16)")
    p.add_argument("--fallback-link-gbps", type=float, default=25.0,
                   help="host->device GB/s that sizes stage 4 when stage 2 left no record")
    p.add_argument("--sim-link-gbps", type=float, default=1.0, help="--device cpu: stage 4's simulated link")
    p.add_argument("--write-gbps", type=float, default=1.5, help="assumed checkpoint write rate, for planning")
    p.add_argument("--load-gbps", type=float, default=3.0, help="assumed checkpoint load rate, for planning")
    p.add_argument("--deadline", type=float, help="the whole check's seconds (default 510; dry run 170)")
    p.add_argument("--force-fail", action="append", default=[], help=argparse.SUPPRESS)
    p.add_argument("--force-hang", action="append", default=[], help=argparse.SUPPRESS)
    return p


def from_args(args: argparse.Namespace, stages: tuple[str, ...], timeouts: dict[str, float]) -> CheckOptions:
    dry, device = args.dry_run, args.device
    tag = f"{device}{'-dry' if dry else ''}"
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results"
                       / f"gpu_check-{tag}")
    return CheckOptions(
        device=device, dry_run=dry, stages=stages, timeouts=timeouts, out=out.resolve(),
        work=(args.work or Path(f"/tmp/moegen-gpu-check-{tag}")).resolve(), prepared=args.prepared.resolve(),
        trace_steps=args.trace_steps or (2 if dry else 4), gpu_memory=args.gpu_memory, weights=args.weights,
        batch=args.batch, prompt=args.prompt or (32 if dry else 512), decode=args.decode or (16 if dry else 32),
        fallback_link_gbps=args.fallback_link_gbps, sim_link_gbps=args.sim_link_gbps, write_gbps=args.write_gbps,
        load_gbps=args.load_gbps, deadline_s=args.deadline or (170.0 if dry else 510.0),
        force_fail=tuple(args.force_fail), force_hang=tuple(args.force_hang), run_id=f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
