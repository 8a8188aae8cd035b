"""A model shape's module launch times on this device: the runtime's own launch functions run on
one layer's real weights, at the token counts and contexts the planner asks about.

Letters: T tokens, H hidden, K top-k, b sequences, c cached context.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable

import torch

from moegen.config import ModelConfig
from moegen.formats import fp8
from moegen.formats.weight_dtype import fp8_kinds
from moegen.models.batch import AttnBatch
from moegen.models.kv_cache import layer_kv
from moegen.models.linear import can_pack, pack_linear, plain
from moegen.models.rope import Rope
from moegen.models.weights import LINEAR_FIELDS, ModelWeights, mlp_params
from moegen.planner.calibrate import DECODE, PREFILL, TOKENS, Curve, Linear, Profile, timed
from moegen.runtime.backend import Counters
from moegen.runtime.cpu_threads import cpu_lanes, side_by_side
from moegen.runtime.device_memory import head_rows
from moegen.runtime.sampling import SamplingParams
from moegen.runtime.tasks import attention_launch, expert_launch, head_launch, mlp_launch, route_launch
from moegen.runtime.tasks.expert_groups import Group, group_launch
from moegen.runtime.worker_stream import CpuStream
from moegen.trace.slices import group_members

GROUP_MEMBERS = 4  # experts per grouped launch profiled
GROUP_UNITS = 16  # distinct experts the profiled groups take their members from
SLOW_S = 0.08  # once a launch takes this long, larger sizes are extrapolated (time grows in proportion)


def signature(cfg: ModelConfig, dtype: str, weights: ModelWeights) -> str:
    """Which profile a model uses: everything about its shape (the config), the dtype and which of its
    modules hold FP8 linears (their streamed launches dequantize first)."""
    return hashlib.sha256(f"{cfg!r}|{dtype}|{fp8_kinds(weights)}".encode()).hexdigest()[:16]


def measure_profile(cfg: ModelConfig, weights: ModelWeights, device: str, dtype: torch.dtype,
                    say: Callable[[str], None] = lambda _: None) -> Profile:
    began = time.perf_counter()
    dev = torch.device(device)
    moe = next((lw for lw in weights.layers if lw.moe is not None), None)
    dense = next((lw for lw in weights.layers if lw.mlp is not None), None)
    H, T = cfg.hidden_size, max(TOKENS)
    h, x, out = (torch.randn(T, H, dtype=dtype, device=dev) for _ in range(3))

    def on(unit):
        return _to(unit, dev, dtype)

    lanes = CpuStream("profile", Counters(), lanes=cpu_lanes()) if device == "cpu" else None
    try:
        some = [] if moe is None else moe.moe.experts[: 2 * (lanes.lanes if lanes else 1)]
        k = cfg.moe.router.top_k
        weights_k = torch.ones(T, k, dtype=torch.float32, device=dev) / k  # [T, K]
        picks = torch.arange(T, device=dev) * k  # [T] token t's first choice

        def expert_curve(units: list) -> Curve:
            return _launch_curve(lambda t, i: expert_launch(units[i % len(units)], x, out, picks[:t], weights_k, k,
                                                            None), mlp_params(units[0]), device, lanes)

        def streamed_curve(units: list) -> Curve:
            """As a streamed expert's launch runs: its FP8 linears (if any) dequantized into a working buffer first."""
            work = [fp8.work_views(u, torch.empty(fp8.work_numel(u), dtype=dtype, device=dev)) for u in units]

            def launch(t: int, i: int) -> None:
                fp8.dequantize_into(units[i % len(units)], work[i % len(units)])
                expert_launch(work[i % len(units)], x, out, picks[:t], weights_k, k, None)

            return _launch_curve(launch, mlp_params(units[0]), device, lanes)

        profile = Profile(
            expert=expert_curve([on(w) for w in some]) if some else None,
            expert_grouped=_grouped_curve([on(w) for w in moe.moe.experts[:GROUP_UNITS]], x, out, k, device,
                                          lanes) if some else None,
            mlps={},
            router=_curve(lambda t: route_launch(h[:t], x[:t], out[:t], on(weights.layers[0].post_attention_layernorm),
                                                 cfg.rms_norm_eps, None if moe is None else on(moe.moe.router),
                                                 cfg.moe.router), TOKENS, device),
            attn_decode=_attention(cfg, weights, dev, dtype, device, decode=True),
            attn_prefill=_attention(cfg, weights, dev, dtype, device, decode=False),
            head=_head_curve(cfg, weights, dev, dtype, device),
            combine=_curve(lambda t: h[:t].add_(out[:t]), TOKENS, device),
        )
        if some and (can_pack(dev, dtype) or fp8.has_fp8(some[0])):  # streamed experts compute over plain
            # weights (their copies are memcpys), FP8 ones dequantized first; residents over reordered ones
            profile.expert_plain = streamed_curve([_to(w, dev, dtype, pack=False) for w in some])
        for name, unit, gate in (("dense", dense and dense.mlp, None),
                                 ("shared", moe and moe.moe.shared, moe and moe.moe.shared_expert_gate)):
            if unit is not None:
                w, g = on(unit), on(gate)
                profile.mlps[name] = _launch_curve(lambda t, _, w=w, g=g: mlp_launch(x[:t], out[:t], w, g),
                                                   mlp_params(w), device, lanes, alone=name == "dense")
    finally:
        if lanes is not None:
            lanes.close()
    say(f"profiled the model's modules on {device} in {time.perf_counter() - began:.1f}s")
    return profile


def _launch_curve(launch: Callable[[int, int], object], params: int, device: str, lanes: CpuStream | None,
                  alone: bool = False) -> Curve:
    """Seconds per launch of an expert or MLP (`params` weights; `launch(t, i)`: the i-th of a group
    over t tokens), run as the runtime submits it: where cpu_threads.side_by_side (`alone`: a dense layer's
    MLP), a group side by side on the cpu compute stream's lanes (the group's time per launch), else
    alone on this thread."""

    def share(t: int) -> int:
        concurrent = side_by_side(2 * t * params, alone)
        return 2 * lanes.lanes if lanes is not None and lanes.lanes > 1 and concurrent else 1

    def group(t: int) -> None:
        if share(t) == 1:
            launch(t, 0)
            return
        events = [lanes.submit(lambda i=i: launch(t, i), concurrent=True) for i in range(share(t))]
        for event in events:
            event.block()

    return _curve(group, TOKENS, device, share)


def _grouped_curve(units: list, x: torch.Tensor, out: torch.Tensor, k: int, device: str, lanes: CpuStream | None
                   ) -> Curve:
    """Seconds per member of a grouped launch (`tasks.expert_groups`) of GROUP_MEMBERS residents over t tokens
    each, the groups run as the runtime submits them (side by side on the cpu lanes where each member would be)."""
    m = min(GROUP_MEMBERS, len(units))
    T = len(x)
    weights_k = torch.ones(T, k, dtype=torch.float32, device=x.device) / k  # [T, K]
    picks = (torch.arange(T * m, device=x.device) % T) * k  # [T*m] the members' tokens, each a token's first choice

    def launch(t: int, i: int) -> None:
        members = [units[(i * m + j) % len(units)] for j in range(m)]
        group_launch(members, Group(tuple(range(m)), (t,) * m, 0), x, out, picks[: t * m], weights_k, k, None)

    per_group = _launch_curve(launch, mlp_params(units[0]), device, lanes)
    return Curve([(n, seconds / m) for n, seconds in per_group.points])


def _to(unit, device: torch.device, dtype: torch.dtype, pack: bool = True):
    """A copy of a weights dataclass (or tensor) on `device` in `dtype`, its linears stored as the
    runtime stores a resident module's (reordered for oneDNN on the cpu: `Backend.place_linear`)
    unless not `pack` (a streamed module's)."""
    if unit is None or isinstance(unit, torch.Tensor):
        return None if unit is None else plain(unit).to(device, dtype)
    if isinstance(unit, fp8.BlockFp8):  # a resident is dequantized once; a streamed one at each launch
        moved = fp8.BlockFp8(unit.data.to(device), unit.scale.to(device))
        return fp8.dequantize(moved, dtype) if pack else moved
    linears = LINEAR_FIELDS.get(type(unit), ()) if pack else ()
    out = {f: _to(getattr(unit, f), device, dtype, pack) for f in unit.__slots__}
    return type(unit)(**{f: pack_linear(t) if f in linears and t is not None else t for f, t in out.items()})


def _curve(launch: Callable[[int], object], sizes, device: str, share: Callable[[int], int] = lambda _: 1) -> Curve:
    """Seconds per launch at each size; `launch(n)` runs `share(n)` launches at once (lanes)."""
    points = []
    for n in sizes:
        seconds = timed(lambda: launch(n), device) / share(n)
        points.append((float(n), seconds))
        if seconds > SLOW_S:
            break
    return Curve(points)


def _attention(cfg: ModelConfig, weights: ModelWeights, dev: torch.device, dtype: torch.dtype, device: str,
               decode: bool) -> Linear:
    """decode: seconds ~ a + p*b + q*b*c over DECODE's (b, c); prefill: ~ a + p*T + r*sum(q^2) over PREFILL."""
    layer = 0
    w = _to(weights.layers[layer].attn, dev, dtype)
    norm = _to(weights.layers[layer].input_layernorm, dev, dtype)
    rope = Rope(cfg.attention.rope, device=dev)
    rows, times = [], []
    for b, n in (DECODE if decode else PREFILL):
        past, q = (n, 1) if decode else (0, n)
        kv = layer_kv(cfg.attention, b, past + q, dtype, dev)
        batch = AttnBatch.build(slots=list(range(b)), past_lens=[past] * b, q_lens=[q] * b, device=dev)
        h = torch.randn(b * q, cfg.hidden_size, dtype=dtype, device=dev)
        times.append(timed(lambda: attention_launch(cfg, layer, norm, rope, w, h, batch, kv), device))
        rows.append([1.0, float(b), float(b * n)] if decode else [1.0, float(b * q), float(b * q * q)])
    return Linear(_fit(rows, times))


def _fit(rows: list[list[float]], times: list[float]) -> list[float]:
    """Least squares on relative error, coefficients kept non-negative (a time never shrinks as work grows)."""
    A = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(times, dtype=torch.float64)
    scale = 1 / y
    keep = list(range(A.shape[1]))
    while True:
        coef = torch.linalg.lstsq(A[:, keep] * scale[:, None], y * scale).solution
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(coef.argmin()))  # drop the feature that would need a negative cost
    out = [0.0] * A.shape[1]
    for i, c in zip(keep, coef.tolist()):
        out[i] = max(c, 0.0)
    return out


def _head_curve(cfg: ModelConfig, weights: ModelWeights, dev: torch.device, dtype: torch.dtype, device: str) -> Curve:
    head = ModelWeights(embed_tokens=None, layers=[], norm=weights.norm.to(dev, dtype),
                        lm_head=_head_weight(weights, dev, dtype))
    h = torch.randn(max(TOKENS), cfg.hidden_size, dtype=dtype, device=dev)
    rows = head_rows(cfg, h.element_size())  # as an unbudgeted run's passes
    greedy = SamplingParams(*(torch.zeros(TOKENS[-1], dtype=dt, device=dev) for dt in (
        torch.float32, torch.int64, torch.float32, torch.int64, torch.int64)), greedy_only=True)
    return _curve(lambda b: head_launch(head, cfg, h[:b], greedy, rows), TOKENS, device)


def _head_weight(weights: ModelWeights, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The lm_head as the runtime places it: reordered for oneDNN on the cpu unless tied to the embedding."""
    w = weights.lm_head.to(dev, dtype)
    return w if weights.lm_head is weights.embed_tokens else pack_linear(w)


def describe_profile(p: Profile, cfg: ModelConfig) -> str:
    """The profile in numbers a user can check: launch times and achieved FLOP/s at a few sizes."""
    lines = []
    flops = 6 * cfg.hidden_size * cfg.moe.expert_intermediate
    for name, curve in (("expert", p.expert), ("expert in a grouped launch", p.expert_grouped),
                        ("streamed expert (plain weights)", p.expert_plain)):
        if curve is not None:
            lines.append(f"  {name}: " + ", ".join(f"{int(n)} tok {t * 1e3:.2f} ms ({flops * n / t / 1e9:.0f} GFLOP/s)"
                                                  for n, t in curve.points))
    for name, curve in p.mlps.items():
        lines.append(f"  {name} MLP: " + ", ".join(f"{int(n)} tok {t * 1e3:.2f} ms" for n, t in curve.points))
    lines.append("  router: " + ", ".join(f"{int(n)} tok {t * 1e3:.2f} ms" for n, t in p.router.points))
    a, per_seq, per_ctx = p.attn_decode.coefficients
    lines.append(f"  attention decode: {a * 1e3:.3f} ms + {per_seq * 1e6:.2f} us per sequence + "
                 f"{per_ctx * 1e9:.1f} ns per cached token")
    a, per_tok, per_sq = p.attn_prefill.coefficients
    lines.append(f"  attention prefill: {a * 1e3:.3f} ms + {per_tok * 1e6:.2f} us per token + "
                 f"{per_sq * 1e9:.2f} ns x prompt length^2")
    lines.append("  lm_head: " + ", ".join(f"{int(n)} seq {t * 1e3:.2f} ms" for n, t in p.head.points))
    if p.in_run:
        lines.append("  in a run, each launch takes longer by: " + ", ".join(
            f"{kind} {s * 1e3:.3f} ms" for kind, s in sorted(p.in_run.items())))
    return "\n".join(lines)


def measure_in_run(cfg: ModelConfig, weights: ModelWeights, rcfg, profile: Profile, sequences: int = 128,
                   prompt_len: int = 16, new_tokens: int = 6) -> dict[str, float]:
    """Per module type, the time a launch takes in a real run beyond what `profile` says it takes alone:
    short runs of the engine (random prompts, EOS ignored) recorded in memory, each compute slice set
    against the profile at its own size; the median per run, the lower of two runs (a busy moment of
    a shared machine inflates one run, not both). In memory, not in a trace file: this runs on a
    user's first serve-offline, where tracing is off and the perfetto package may be missing."""
    import dataclasses

    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request
    from moegen.trace.memory import MemoryRecorder

    gen = torch.Generator().manual_seed(0)
    requests = [Request(torch.randint(0, cfg.vocab_size, (prompt_len,), generator=gen).tolist(), new_tokens,
                        ignore_eos=True) for _ in range(sequences)]
    # Unbudgeted, nothing streamed: copies' cost is calibrated on its own (`Machine.copy_cost_s_per_byte`).
    run = dataclasses.replace(rcfg, batch_size=sequences, attn_micro_batch=sequences, expert_micro_batch=None,
                              max_seq_len=prompt_len + new_tokens, gpu_memory=None, sim_link_gbps=None,
                              expert_slots=None, resident_experts=None, batching="module", max_step_tokens=8192)
    medians: dict[str, float] = {}
    for _ in range(2):
        recorder = MemoryRecorder()
        with Engine(cfg, weights, run, (), trace=recorder) as engine:
            for _ in engine.generate(requests):
                pass
        extra: dict[str, list[float]] = {}
        for kind, seconds, alone in _launch_times(recorder.slices, profile, cfg):
            extra.setdefault(kind, []).append(seconds - alone)
        for kind, v in extra.items():
            medians[kind] = min(medians.get(kind, math.inf), max(0.0, sorted(v)[len(v) // 2]))
    return medians


def _launch_times(slices, profile: Profile, cfg: ModelConfig) -> list[tuple[str, float, float]]:
    """(module type, seconds in the run, seconds alone per the profile) of each compute launch. Launches
    that ran side by side on lanes are taken by group (overlapping slices): the group's time, shared
    out in proportion to the launches' profiled times."""
    from moegen.trace.slices import module_kind, stream_of

    out, lanes = [], []
    for s in slices:
        if "compute" not in s.track or s.depth != 0:
            continue
        kind = module_kind(s.name)
        alone = _alone(profile, cfg, kind, s.args)
        if alone is None:
            continue
        if stream_of(s.track) != s.track:
            lanes.append((s.start, s.end, kind, alone))
        else:
            out.append((kind, (s.end - s.start) / 1e9, alone))
    lanes.sort()
    group: list = []
    for item in lanes + [None]:
        if group and (item is None or item[0] >= max(g[1] for g in group)):
            took = (max(g[1] for g in group) - group[0][0]) / 1e9
            total = sum(g[3] for g in group) or 1.0
            out += [(g[2], took * g[3] / total, g[3]) for g in group]
            group = []
        if item is not None:
            group.append(item)
    return out


def _alone(p: Profile, cfg: ModelConfig, kind: str, args: dict) -> float | None:
    tokens = int(args.get("tokens", 0))
    members = group_members(args)
    if kind == "expert" and members and p.expert_grouped is not None:  # a grouped launch
        return sum(p.expert_grouped(n) for _, n in members)
    if kind == "expert" and p.expert is not None:
        return p.expert(tokens)
    if kind == "mlp":
        layer = int(args.get("layer", 0))
        return p.mlps["shared" if cfg.moe_layers[layer] else "dense"](tokens)
    if kind == "router":
        return p.router(tokens)
    if kind == "combine":
        return p.combine(tokens)
    if kind == "attention":
        b = int(args.get("sequences", 1))
        if tokens == b:
            return p.attn_decode(b, int(args.get("cached", 0)))
        return p.attn_prefill(tokens, int(args.get("query_sq", tokens * tokens)))
    if kind == "lm_head":
        return p.head(int(args.get("sequences", 1)))
    return None
