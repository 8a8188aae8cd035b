"""The cost model: a runtime config made concrete for a model (`Setting`: the batch, residents, slot
pools and memory it would really take), and the predicted time of its steps.

A step is simulated as the runtime runs it, on three resources: the compute stream (in launch
order), the weights copy stream (the prefetcher's walk, each copy waiting for a free slot of its
kind: the slot frees when the compute that used it ends) and the KV copy stream (one staging copy
per attention micro-batch). Per layer: attention weights -> micro-batches (KV staged in, attend)
-> router -> host sync for the expert counts -> MLP, experts (each waiting for its weights) ->
combine; then lm_head and the host sync on the sampled ids. Two steps run back to back and the
second is timed, so the prefetcher's walk into the next step counts. Launch times come from the
calibrated `Profile`, copy times from the link (the simulated one on the cpu backend, exactly); on
the cpu backend a copy is also a real memcpy on a core the compute threads share, so each copied
byte adds the calibrated compute time it costs to the next launch.

Routing is taken as uniform: T tokens spread their T*K picks evenly over the E experts.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from moegen.config import ModelConfig
from moegen.models.kv_cache import kv_bytes_per_token
from moegen.runtime.kv.sizing import host_kv_blocks, kv_block_bytes
from moegen.models.weights import ModelWeights
from moegen.planner.calibrate import Machine, Profile
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.cpu_threads import cpu_lanes
from moegen.runtime.device_memory import (LaunchSizes, activation_bytes, launch_sizes, model_batch_size, staging_bytes,
                                          step_tokens, transient_bytes)
from moegen.runtime.host_attention.worker import device_bytes as host_attention_device_bytes
from moegen.runtime.host_attention.worker import per_sequence_numel as host_attention_numel
from moegen.runtime.kv.sizing import host_kv_bytes_per_token
from moegen.units import format_bytes
from moegen.runtime.residency import ModuleId, ModuleSize, Residency, choose_residency, core_device_bytes, module_sizes


@dataclass(frozen=True, slots=True)
class Workload:
    requests: int
    prompt_len: float  # mean prompt tokens
    new_tokens: float  # mean tokens generated per request (its cap: EOS may end it earlier)
    max_seq_len: int  # longest prompt + completion: the most KV one sequence may hold
    prefix_hit_rate: float = 0.0  # share of prompt tokens found in shared prefix blocks (`kv.prefix`), not computed
    caps_differ: bool = False  # rows carry different max_new_tokens (each row's is then what it is expected to need)


@dataclass(slots=True)
class ModelFacts:
    """What the cost model reads of a loaded model (sizes in the runtime dtype; FP8 linears as stored)."""

    cfg: ModelConfig
    weights: ModelWeights
    sizes: dict[ModuleId, ModuleSize]  # each streamable module's bytes: host block (= one copy), resident, slot
    core_bytes: int  # lm_head, norms, routers: always on the device

    @classmethod
    def of(cls, cfg: ModelConfig, weights: ModelWeights, dtype: torch.dtype) -> ModelFacts:
        return cls(cfg, weights, module_sizes(weights, dtype), core_device_bytes(weights, dtype))

    @property
    def arena_bytes(self) -> int:
        return sum(s.host for s in self.sizes.values())


@dataclass(slots=True)
class Setting:
    """What a run with `rcfg` would be: the runtime's own sizing rules applied without allocating."""

    rcfg: RuntimeConfig
    batch: int  # B (--batching model: what fits the device)
    micro: int  # sequences per attention launch
    stage_kv: bool  # KV staged onto the device per micro-batch
    max_step_tokens: int
    residency: Residency
    device_bytes: int | None  # what it reserves on the device (None: no device budget to hold to)
    budget: int | None  # the device budget it was sized against
    host_bytes: int  # weight arena + host KV cache
    link_gbps: float | None  # host -> device copies (None: nothing is copied)
    sizes: LaunchSizes  # how large each launch may be (experts split past sizes.expert_tokens)
    kv_blocks: int = 0  # blocks of the host KV cache (--batching model: none, its rows are on the device)
    fp8_residents: tuple[int, int] = (0, 0)  # residents holding FP8 linears, and the device bytes dequantizing
    # them once at load costs beyond their bytes as stored (a resident's launches then never dequantize)


def setting(facts: ModelFacts, rcfg: RuntimeConfig, machine: Machine, budget: int | None) -> Setting:
    """Size a run like `Runtime.__init__` does; raises DeviceBudgetError where it would."""
    cfg, dtype, S = facts.cfg, rcfg.torch_dtype, rcfg.max_seq_len
    model_mode = rcfg.batching == "model"
    B = model_batch_size(cfg, rcfg, facts.weights, budget) if model_mode else rcfg.batch_size
    stage = not model_mode and not (rcfg.device == "cpu" and budget is None)
    micro = B if model_mode else min(rcfg.attn_micro_batch, B)
    max_step = step_tokens(rcfg, B)
    per_token = kv_bytes_per_token(cfg, dtype)
    kv = B * S * per_token if model_mode else (staging_bytes(cfg, rcfg, micro, max_step) if stage else 0)
    sizes = launch_sizes(cfg, rcfg, budget, max_step, micro, B)
    if not model_mode:  # --cpu-attention: the host-attended share's q/k/v and outputs, as the runtime reserves them
        kv += host_attention_device_bytes(cfg, math.ceil(rcfg.cpu_attention * B), rcfg.torch_dtype.itemsize)
    reserved = (facts.core_bytes + kv + activation_bytes(cfg, rcfg, max_step, B)
                + transient_bytes(cfg, rcfg, sizes, max_step, micro, B))
    if budget is not None and reserved > budget:
        from moegen.runtime.backend import DeviceBudgetError

        raise DeviceBudgetError(
            f"lm_head, norms and routers, KV staging, activations and transient memory need {reserved / 2**20:.1f} MiB, over "
            f"--gpu-memory {format_bytes(budget)}; raise --gpu-memory, or lower --max-seq-len, --max-step-tokens or "
            "--attn-micro-batch")
    residency = choose_residency(facts.sizes, None if budget is None else budget - reserved, rcfg.expert_slots,
                                 rcfg.resident_experts)
    streams = any(residency.pools.values())
    link = rcfg.sim_link_gbps or (machine.link_h2d_gbps if rcfg.device == "cuda" else machine.memcpy_gbps)
    blocks = 0 if model_mode else host_kv_blocks(cfg, rcfg, B)
    return Setting(rcfg, B, micro, stage, max_step, residency,
                   reserved + residency.device_bytes if budget is not None else None, budget,
                   facts.arena_bytes + blocks * kv_block_bytes(cfg, rcfg),
                   link if (streams or stage) else None, sizes, blocks, _fp8_residents(facts, residency))


def _fp8_residents(facts: ModelFacts, residency: Residency) -> tuple[int, int]:
    dequantized = [facts.sizes[m] for m in residency.resident if facts.sizes[m].work]
    return len(dequantized), sum(s.resident - s.host for s in dequantized)


@dataclass(slots=True)
class StepTime:
    seconds: float
    compute_s: float  # compute stream busy
    link_s: float  # the busiest host -> device link busy (cuda: one link for weights and KV; the cpu backend
    # simulates one per copy stream)
    modules: dict[str, float]  # compute seconds per module type (the trace's names: attention, expert, ...)

    @property
    def bound(self) -> str:
        return "link" if self.link_s >= self.compute_s else "compute"


def step_time(facts: ModelFacts, s: Setting, p: Profile, m: Machine, decode: int, context: float,
              prompts: int = 0, prompt_len: int = 0) -> StepTime:
    """A step of `decode` sequences with `context` cached tokens each plus `prompts` new prompts of
    `prompt_len` tokens, in steady state (the second of two identical steps)."""
    sim = _Sim(facts, s, p, m)
    sim.step(decode, context, prompts, prompt_len)
    first = sim.end
    c0, l0, by_kind = sim.compute_busy, sim.link_busy, dict(sim.modules)
    sim.step(decode, context, prompts, prompt_len)
    return StepTime(sim.end - first, sim.compute_busy - c0, sim.link_busy - l0,
                    {k: v - by_kind.get(k, 0.0) for k, v in sim.modules.items()})


class _Sim:
    """Resource clocks (seconds) for simulated steps."""

    def __init__(self, facts: ModelFacts, s: Setting, p: Profile, m: Machine):
        self.f, self.s, self.p, self.m = facts, s, p, m
        self.compute = self.weights = self.kv = self.end = 0.0
        self.compute_busy = 0.0
        self.busy = {"weights": 0.0, "kv": 0.0}  # per link
        self.shared_link = s.rcfg.device == "cuda"  # weights and KV copies cross one PCIe link
        self.copy_cost = 0.0  # compute seconds the copies so far take from the next launch (cpu backend)
        self.modules: dict[str, float] = {}
        self.slots = {kind: deque([0.0] * n) for kind, n in s.residency.pools.items()}
        self.resident = set(s.residency.resident)
        self.bytes_per_s = None if s.link_gbps is None else s.link_gbps * 1e9
        cfg = facts.cfg
        self.kv_token_layer = host_kv_bytes_per_token(cfg, s.rcfg) // cfg.num_layers  # staged bytes (--kv-dtype)
        self.host = 0.0  # the host attention worker's clock (cuda: beside the device)
        self.host_returned_bytes = host_attention_numel(cfg)[1] * s.rcfg.torch_dtype.itemsize  # per sequence

    def launch(self, kind: str, seconds: float, ready: float = 0.0) -> float:
        seconds += self.p.in_run.get(kind, 0.0) + self.copy_cost
        self.copy_cost = 0.0
        start = max(self.compute, ready)
        self.compute = start + seconds + self.m.launch_s
        self.compute_busy += seconds
        self.modules[kind] = self.modules.get(kind, 0.0) + seconds
        return self.compute

    def copy_weights(self, module: ModuleId) -> float:
        """When `module`'s weights are on the device for the next compute that uses it."""
        if module in self.resident:
            return 0.0
        start = max(self.weights, self.slots[module.kind].popleft())
        took = self.f.sizes[module].host / self.bytes_per_s
        self.copy_cost += self.f.sizes[module].host * self.m.copy_cost_s_per_byte
        self.weights = start + took
        self.busy["weights"] += took
        if self.shared_link:
            self.kv = max(self.kv, self.weights)
        return self.weights

    def used(self, module: ModuleId, end: float) -> None:
        if module not in self.resident:
            self.slots[module.kind].append(end)

    def copy_kv(self, nbytes: float, after: float = 0.0) -> float:
        if not nbytes or self.bytes_per_s is None:
            return after
        took = max(nbytes / self.bytes_per_s, nbytes / (self.m.memcpy_gbps * 1e9))
        self.copy_cost += nbytes * self.m.copy_cost_s_per_byte
        self.kv = max(self.kv, after) + took
        self.busy["weights" if self.shared_link else "kv"] += took
        if self.shared_link:
            self.weights = max(self.weights, self.kv)
        return self.kv

    def host_attention(self, b: int, context: float, ready: float) -> float:
        """The host-attended share of a decode step's layer: its projections on the device (half of a launch
        over b sequences and no context: the other half is its output projection), then the host's attention;
        returns when the host is done. On the cpu backend the host worker shares the compute stream's cores, so
        its time is the compute clock's too; on cuda it is a clock of its own, beside the device."""
        p = self.p
        projected = self.launch("attention", p.attn_decode(b, 0) / 2, ready)
        took = (p.host_attn or p.attn_decode)(b, b * context)
        if self.s.rcfg.device == "cpu":
            return self.launch("host attention", took, projected)
        self.host = max(self.host, projected) + took
        self.modules["host attention"] = self.modules.get("host attention", 0.0) + took
        return self.host

    @property
    def link_busy(self) -> float:
        return max(self.busy.values())

    def experts(self, layer: int, T: int, routed: float) -> None:
        """A layer's routed experts once its counts are read (`routed`): the residents in grouped launches (as
        `tasks.expert_groups` cuts them: two per cpu lane, one elsewhere) when --expert-groups, each member at the
        profile's time per member of a group; every other expert alone, once its weights are in."""
        p, cap, router = self.p, self.s.sizes.expert_tokens, self.f.cfg.moe.router
        spread = _spread(T * router.top_k, router.num_experts)
        grouped = self.s.rcfg.expert_groups and p.expert_grouped is not None
        members = [n for e, n in enumerate(spread) if n and grouped and ModuleId("expert", layer, e) in self.resident]
        if members:
            pieces = min(len(members), 2 * cpu_lanes() if self.s.rcfg.device == "cpu" and cpu_lanes() > 1 else 1)
            total = sum(_capped(p.expert_grouped, n, cap) for n in members)
            for _ in range(pieces):
                self.launch("expert", total / pieces, routed)
        for e, n in enumerate(spread):
            module = ModuleId("expert", layer, e)
            if not n or (grouped and module in self.resident):
                continue
            ready = max(self.copy_weights(module), routed)
            curve = p.expert if module in self.resident or p.expert_plain is None else p.expert_plain
            self.used(module, self.launch("expert", _capped(curve, n, cap), ready))

    def step(self, decode: int, context: float, prompts: int, prompt_len: int) -> None:
        f, s, p, m = self.f, self.s, self.p, self.m
        cfg = f.cfg
        T = decode + prompts * prompt_len
        start = self.end
        elem = s.rcfg.torch_dtype.itemsize
        h_ready = self.copy_kv(T * cfg.hidden_size * elem, start)  # the embedding rows cross the link
        self.launch("embed", p.combine(T), h_ready)
        on_host = round(s.rcfg.cpu_attention * decode) if s.rcfg.batching == "module" else 0
        decode_groups = _groups(decode - on_host, s.micro)
        groups = decode_groups + _groups(prompts, s.micro)
        for layer in range(cfg.num_layers):
            attn = ModuleId("attn", layer)
            end = ready = self.copy_weights(attn)
            host_done = self.host_attention(on_host, context, ready) if on_host else 0.0
            for i, b in enumerate(groups):
                is_decode = i < len(decode_groups)
                ctx = context if is_decode else 0
                kv_ready = self.copy_kv(b * ctx * self.kv_token_layer if s.stage_kv else 0, start)
                took = (p.attn_decode(b, b * ctx) if is_decode
                        else p.attn_prefill(b * prompt_len, b * prompt_len ** 2))
                end = self.launch("attention", took, max(ready, kv_ready))
            if on_host:  # its output crosses back, then the output projection
                back = self.copy_kv(on_host * self.host_returned_bytes, host_done)
                end = self.launch("attention", p.attn_decode(on_host, 0) / 2, back)
            self.used(attn, end)
            routed = self.launch("router", p.router(T))
            mlp = ModuleId("mlp", layer)
            if mlp in f.sizes:
                curve = p.mlps["shared" if cfg.moe_layers[layer] else "dense"]
                self.used(mlp, self.launch("mlp", curve(T), self.copy_weights(mlp)))
            if cfg.moe_layers[layer]:
                self.experts(layer, T, routed + m.sync_s)
            self.launch("combine", p.combine(T))
        self.end = self.launch("lm_head", p.head(decode + prompts)) + m.sync_s


def _groups(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


def _spread(picks: int, experts: int) -> list[int]:
    """`picks` token-expert picks spread evenly over the experts."""
    base, extra = divmod(picks, experts)
    return [base + (e < extra) for e in range(experts)]


def _capped(curve, n: int, cap: int | None) -> float:
    if not cap or n <= cap:
        return curve(n)
    full, rest = divmod(n, cap)
    return full * curve(cap) + (curve(rest) if rest else 0.0)


@dataclass(slots=True)
class Prediction:
    prefill_tok_s: float  # prompt tokens per second of a prefill step
    decode_tok_s: float  # generated tokens per second of a full decode step
    job_s: float  # prefill and decode of the whole workload
    job_tok_s: float  # generated tokens over job_s
    prefill: StepTime
    decode: StepTime


def predict(facts: ModelFacts, s: Setting, p: Profile, m: Machine, w: Workload) -> Prediction:
    """The whole job: its prompts admitted max_step_tokens at a time (each prompt's step samples its
    first token), then waves of B sequences decoding the rest (with uniform request lengths all of a
    wave finish together)."""
    B = min(s.batch, w.requests)
    P = max(1, round(w.prompt_len))
    per_step = max(1, min(B, s.max_step_tokens // P))
    prefill = step_time(facts, s, p, m, 0, 0, per_step, P)
    context = w.prompt_len + w.new_tokens / 2
    decode = step_time(facts, s, p, m, B, context)
    full, rest = divmod(w.requests, B)
    steps = max(0.0, w.new_tokens - 1)  # a request's first token is sampled in its prefill step
    decode_s = steps * (full * decode.seconds + (step_time(facts, s, p, m, rest, context).seconds if rest else 0.0))
    prefill_s = math.ceil(w.requests / per_step) * prefill.seconds * (1 - w.prefix_hit_rate)  # shared: computed once
    job_s = prefill_s + decode_s
    return Prediction(per_step * P / prefill.seconds, B / decode.seconds, job_s,
                      w.requests * w.new_tokens / job_s, prefill, decode)
