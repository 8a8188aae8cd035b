"""Calibration: what this machine's device does, measured once and cached per machine and device.

Two parts, one cache file per (device, machine):
- the machine: host->device and device->host bandwidth (pinned buffers; a simulated link on the
  cpu backend is known exactly and never measured), host memcpy bandwidth, and the host's cost of a
  module launch and of a host sync through the event loop;
- per model shape (a `Profile`): the time of each module's launch at the shapes that matter, measured
  by running the runtime's own launch functions on one layer's real weights: an expert, the dense
  and shared MLPs, the router over T tokens; attention over b sequences of context c (decode) and b
  prompts of q tokens (prefill); lm_head + sampling over b sequences.

The file is discarded when moegen's, torch's or the cache format's version differs, or the device
or CPU is another (its key is in the file name and re-checked inside).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch

from moegen.io import json_bytes
from moegen.planner import steadiness
from moegen.runtime.cpu_threads import cpu_lanes

CACHE_FORMAT = 9  # raised whenever what is measured changes meaning (3: small cpu launches run on one thread;
# 4: lanes; 5: oneDNN-reordered residents; 6: streamed experts' plain weights measured apart; 7: a dense
# layer's MLP alone, not on a lane; 8: the lm_head in passes of bounded rows, MLA prefill on a fused kernel;
# 9: grouped expert launches)
TOKENS = (1, 4, 16, 64, 256, 1024, 2048, 4096)  # tokens per launch measured for MLPs, routers and the head
DECODE = ((1, 16), (1, 1024), (16, 16), (16, 256), (16, 1024), (64, 16), (64, 256), (64, 1024), (256, 16),
          (256, 256))  # (sequences, context) of decode attention launches
PREFILL = ((1, 16), (1, 256), (4, 64), (16, 16), (16, 64), (4, 512))  # (prompts, tokens each)
BUDGET_S = 0.1  # most seconds spent repeating one measurement (the best repeat counts)


@dataclass(slots=True)
class Curve:
    """Seconds of one launch vs its size, from measured points: log-log interpolation inside,
    proportional beyond the largest point, the smallest point's time below it."""

    points: list[tuple[float, float]]  # (size, seconds), sizes increasing

    def __call__(self, size: float) -> float:
        pts = self.points
        if size <= pts[0][0]:
            return pts[0][1]
        if size >= pts[-1][0]:
            return pts[-1][1] * size / pts[-1][0]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if size <= x1:
                f = math.log(size / x0) / math.log(x1 / x0)
                return math.exp(math.log(y0) + f * math.log(y1 / y0))
        raise AssertionError("unreachable")


@dataclass(slots=True)
class Linear:
    """seconds = coefficients · features, fitted to measured launches (least squares, relative error)."""

    coefficients: list[float]

    def __call__(self, *features: float) -> float:
        return max(0.0, sum(c * f for c, f in zip(self.coefficients, (1.0, *features))))


@dataclass(slots=True)
class Machine:
    link_h2d_gbps: float | None  # pinned host -> device, GB/s (1e9 bytes); None on the cpu backend
    link_d2h_gbps: float | None
    memcpy_gbps: float  # a large copy within host memory
    launch_s: float  # the event loop's cost of one module launch (queue hop + submit)
    sync_s: float  # a host sync: device event -> waiter -> the loop resumes a task
    copy_cost_s_per_byte: float = 0.0  # cpu backend: compute time lost per byte a copy thread moves (its
    # memcpy takes a core and memory bandwidth from the compute threads); 0 on cuda (copy engines)
    bf16_speedup: float = 0.0  # cpu: an expert-sized matmul in bfloat16 against float32 as the runtime runs each
    # (float32 over oneDNN-reordered weights); below 1 where the CPU has no native bf16; 0: not measured


@dataclass(slots=True)
class Profile:
    """One model shape's module launch times on this device."""

    expert: Curve | None  # tokens -> seconds, one routed expert
    mlps: dict[str, Curve]  # "dense" / "shared": tokens -> seconds
    router: Curve  # tokens -> seconds (norm, routing, sort, counts)
    attn_decode: Linear  # (sequences, sequences x context) -> seconds
    attn_prefill: Linear  # (tokens, sum of q^2) -> seconds
    head: Curve  # sequences -> seconds (final norm, lm_head, greedy pick)
    combine: Curve  # tokens -> seconds (the residual add)
    in_run: dict[str, float] = field(default_factory=dict)  # module type -> seconds a launch takes in a real run
    # beyond its time alone (the event loop's thread shares the cores: small launches pay most)
    expert_plain: Curve | None = None  # tokens -> seconds, one routed expert over plain weights: a streamed
    # expert's, where residents' weights are reordered for the matmul (the cpu's oneDNN); None: as `expert`
    expert_grouped: Curve | None = None  # tokens -> seconds per member of a grouped launch of resident experts
    # (`tasks.expert_groups`); None: not measured (as `expert`)
    host_attn: Linear | None = None  # (sequences, sequences x context) -> seconds of one layer's decode attention
    # on the host worker (`planner.host_profile`); None: not measured (no share of attention is planned)
    host_attn_threads: int = 0  # the threads host_attn was measured with (another --cpu-attention-threads: again)


@dataclass(slots=True)
class Calibration:
    key: dict  # device, machine and versions this was measured on
    machine: Machine
    profiles: dict[str, Profile] = field(default_factory=dict)  # by model shape signature
    steadiness: dict[str, steadiness.Steadiness] = field(default_factory=dict)  # "machine" and each profile's
    # signature: how steady the machine was while each was measured (an unsteady one is never cached)


def device_key(device: str) -> dict:
    """What a calibration is only valid for."""
    key = {"format": CACHE_FORMAT, "device": device, "moegen": version("moegen"), "torch": torch.__version__,
           "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
           "grid": json_bytes.loads(json_bytes.dumps([TOKENS, DECODE, PREFILL]))}  # as JSON holds it, for comparing
    if device == "cpu":
        key["lanes"] = cpu_lanes()
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                             "run on a machine with a GPU and a CUDA build of torch, or use --device cpu")
        props = torch.cuda.get_device_properties(0)
        key |= {"gpu": props.name, "gpu_bytes": props.total_memory}
    return key


def cache_path(key: dict) -> Path:
    from moegen.checkpoints.demo import cache_dir

    digest = hashlib.sha256(json_bytes.dumps(key, sort_keys=True)).hexdigest()[:16]
    return cache_dir() / "calibration" / f"{key['device']}-{digest}.json"


def load(device: str) -> Calibration | None:
    """The cached calibration for this device and machine, or None (none yet, or made by another
    version, device or machine)."""
    key = device_key(device)
    path = cache_path(key)
    try:
        raw = json_bytes.loads(path.read_bytes())
    except (OSError, json_bytes.JSONDecodeError):
        return None
    if raw.get("key") != key:
        return None
    return Calibration(key, Machine(**raw["machine"]),
                       {sig: _profile(p) for sig, p in raw.get("profiles", {}).items()},
                       {k: steadiness.Steadiness(**v) for k, v in raw.get("steadiness", {}).items()})


def save(cal: Calibration) -> Path | None:
    """Cache what was measured steadily: nothing when the machine's part was not, else the machine and the
    steady profiles. Returns the file, or None when nothing was cached."""
    steady = {k: v.steady for k, v in cal.steadiness.items()}
    if not steady.get("machine", True):
        return None
    data = asdict(cal)
    data["profiles"] = {sig: p for sig, p in data["profiles"].items() if steady.get(sig, True)}
    data["steadiness"] = {k: v for k, v in data["steadiness"].items() if steady[k]}
    path = cache_path(cal.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # its own: engines on one node may save at once
    tmp.write_bytes(json_bytes.dumps(data, indent=True))
    tmp.replace(path)
    return path


def _profile(raw: dict) -> Profile:
    curve = lambda pts: Curve([tuple(p) for p in pts["points"]])  # noqa: E731
    return Profile(expert=curve(raw["expert"]) if raw["expert"] else None,
                   mlps={k: curve(v) for k, v in raw["mlps"].items()}, router=curve(raw["router"]),
                   attn_decode=Linear(raw["attn_decode"]["coefficients"]),
                   attn_prefill=Linear(raw["attn_prefill"]["coefficients"]),
                   head=curve(raw["head"]), combine=curve(raw["combine"]), in_run=raw.get("in_run", {}),
                   expert_plain=curve(raw["expert_plain"]) if raw.get("expert_plain") else None,
                   expert_grouped=curve(raw["expert_grouped"]) if raw.get("expert_grouped") else None,
                   host_attn=Linear(raw["host_attn"]["coefficients"]) if raw.get("host_attn") else None,
                   host_attn_threads=raw.get("host_attn_threads", 0))


def calibrated(device: str, force: bool = False, say: Callable[[str], None] = lambda _: None) -> Calibration:
    """The cached calibration, measuring the machine first when there is none (or `force`)."""
    cal = None if force else load(device)
    if cal is None:
        say(f"calibrating the {device} device (cached for later runs) ...")
        with steadiness.measuring() as found:
            machine = measure_machine(device)
        cal = Calibration(device_key(device), machine, steadiness={"machine": found})
        if not found.steady:
            say(found.note(f"the {device} device's calibration"))
        save(cal)
    return cal


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


# -- measuring ----------------------------------------------------------------------------------

def timed(fn: Callable[[], object], device: str, budget_s: float = BUDGET_S) -> float:
    """Best seconds of `fn` over up to 20 repeats within `budget_s` (at least three, after a warm-up run); how
    far its repeats disagree goes to `steadiness`."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < budget_s and len(times) < 20):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    steadiness.record(times)
    return min(times)


def measure_machine(device: str) -> Machine:
    n = 64 * 2**20
    src = torch.empty(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    memcpy = n / timed(lambda: dst.copy_(src), "cpu") / 1e9
    h2d = d2h = None
    if device == "cuda":
        pinned = torch.empty(4 * n, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(4 * n, dtype=torch.uint8, device="cuda")
        h2d = 4 * n / timed(lambda: dev.copy_(pinned, non_blocking=True), device) / 1e9
        d2h = 4 * n / timed(lambda: pinned.copy_(dev, non_blocking=True), device) / 1e9
    launch, sync = _loop_costs(device)
    return Machine(link_h2d_gbps=h2d, link_d2h_gbps=d2h, memcpy_gbps=memcpy, launch_s=launch, sync_s=sync,
                   copy_cost_s_per_byte=_copy_cost(src, dst) if device == "cpu" else 0.0,
                   bf16_speedup=bf16_speedup() if device == "cpu" else 0.0)


def bf16_speedup() -> float:
    """float32 seconds / bfloat16 seconds of a [256, 1024] x [1024, 2816] linear on the cpu, each the way the
    runtime runs it (`models.linear`: a oneDNN-reordered weight where `can_pack`), best of 3 each."""
    from moegen.models.linear import linear, pack_linear

    w, x = torch.randn(2816, 1024), torch.randn(256, 1024)
    w32, w16, x16 = pack_linear(w), pack_linear(w.bfloat16()), x.bfloat16()
    f32 = min(timed(lambda: linear(x, w32), "cpu") for _ in range(3))
    bf16 = min(timed(lambda: linear(x16, w16), "cpu") for _ in range(3))
    return f32 / bf16


def _copy_cost(src: torch.Tensor, dst: torch.Tensor) -> float:
    """Seconds of compute lost per byte copied by another thread: small MLP launches (the kind a
    decode step is made of) timed alone, then beside a thread copying host memory without pause."""
    import threading

    import torch.nn.functional as F

    g, u, d = torch.randn(2816, 1024), torch.randn(2816, 1024), torch.randn(1024, 2816)
    x = torch.randn(64, 1024)

    def launches() -> float:
        start = time.perf_counter()
        for _ in range(12):
            F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
        return time.perf_counter() - start

    launches()
    alone = min(launches() for _ in range(3))
    stop, copied = threading.Event(), [0]

    def copier() -> None:
        while not stop.is_set():
            dst.copy_(src)
            copied[0] += src.numel()

    thread = threading.Thread(target=copier, daemon=True)
    thread.start()
    time.sleep(0.02)
    before = copied[0]
    beside = launches()
    moved = copied[0] - before
    stop.set()
    thread.join()
    return max(0.0, beside - alone) / moved if moved else 0.0


def _loop_costs(device: str, n: int = 400) -> tuple[float, float]:
    """(seconds per module launch: a queue hop plus a stream submit, nothing waited on; seconds per host
    sync: submit, then resume on the work's event) on the runtime's own backend and event loop."""
    import uvloop

    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.engine import make_backend

    backend = make_backend(RuntimeConfig(device=device))

    async def launches() -> float:
        q: asyncio.Queue = asyncio.Queue()
        start = time.perf_counter()
        for _ in range(n):
            await q.put(1)
            await q.get()
            backend.compute.submit(lambda: None)
        await backend.wait(backend.compute.submit(lambda: None))
        return (time.perf_counter() - start) / n

    async def syncs() -> float:
        start = time.perf_counter()
        for _ in range(n // 4):
            await backend.wait(backend.compute.submit(lambda: None))
        return (time.perf_counter() - start) / (n // 4)

    try:
        return min(uvloop.run(launches()) for _ in range(3)), min(uvloop.run(syncs()) for _ in range(3))
    finally:
        backend.close()
