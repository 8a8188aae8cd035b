"""The search: every batch knob the user left unset, chosen for the best predicted job throughput
within both memory budgets.

Knobs searched: B (powers of two up to the number of requests, and that number, as many as the host
KV cache's blocks hold at the KV each sequence is expected to hold: its prompt and its cap, on average), the
host KV cache's bytes (its share of the host, no more than B sequences' longest could use), the
attention micro-batch (B, B/2, ... within the device's KV staging), how many experts stay resident (the
rest stream through every slot the budget leaves), and under a device budget the step's token budget (its
default, or the least that admits any prompt: activations are sized by it). Knobs the user set are
fixed; the rest are planned around them. The expert micro-batch cap is kept off (one launch per
expert is never slower in the model) unless the user sets it. The share of decode attention on
the host (`--cpu-attention`) is searched among SHARES where staged KV crosses a link and the host's attention
is measured (`planner.host_profile`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field

from moegen.planner.calibrate import Machine, Profile
from moegen.planner.cost import ModelFacts, Prediction, Setting, Workload, predict, setting, step_time
from moegen.runtime.backend import DeviceBudgetError
from moegen.runtime.config import RuntimeConfig
from moegen.units import format_bytes

PLANNED = ("batch_size", "attn_micro_batch", "expert_micro_batch", "expert_slots", "resident_experts",
           "max_step_tokens", "host_kv_memory", "cpu_attention")
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)  # --cpu-attention shares searched
HOST_SHARE = 0.7  # of the host memory available when planning, what the KV cache may take


@dataclass(slots=True)
class Candidate:
    rcfg: RuntimeConfig
    setting: Setting
    predicted: Prediction

    def knobs(self) -> dict:
        return {name: getattr(self.rcfg, name) for name in PLANNED}

    def summary(self) -> dict:
        s, p = self.setting, self.predicted
        return {"knobs": self.knobs(), "batch": s.batch, "expert_slots": s.residency.pools.get("expert", 0),
                "resident_experts": sum(m.kind == "expert" for m in s.residency.resident),
                "prefill_tok_s": p.prefill_tok_s, "decode_tok_s": p.decode_tok_s, "job_tok_s": p.job_tok_s,
                "job_s": p.job_s}


@dataclass(slots=True)
class Plan:
    rcfg: RuntimeConfig  # the config in effect: the user's knobs and the planned ones
    user: tuple[str, ...]  # knobs the user set (never changed)
    workload: Workload
    best: Candidate
    alternatives: list[Candidate]  # the runners-up, best first
    limits: list[str] = field(default_factory=list)  # what cut the search short, in words
    considered: int = 0
    decode_fixed_share: float = 0.5  # a decode step of one sequence over one of B: what its tokens don't change

    @property
    def bound(self) -> dict[str, str]:
        p = self.best.predicted
        return {"prefill": p.prefill.bound, "decode": p.decode.bound}

    def to_json(self) -> dict:
        p, s = self.best.predicted, self.best.setting
        return {
            "knobs": self.best.knobs(), "user_knobs": list(self.user),
            "workload": dataclasses.asdict(self.workload),
            "predicted": {"prefill_tok_s": p.prefill_tok_s, "decode_tok_s": p.decode_tok_s, "job_s": p.job_s,
                          "job_tok_s": p.job_tok_s, "decode_step_s": p.decode.seconds,
                          "decode_fixed_share": self.decode_fixed_share,
                          "prefill_step_s": p.prefill.seconds, "decode_modules": p.decode.modules,
                          "prefill_modules": p.prefill.modules,
                          "decode_busy": {"compute": p.decode.compute_s / p.decode.seconds,
                                          "link": p.decode.link_s / p.decode.seconds}},
            "bound": self.bound, "limits": self.limits,
            "memory": {"device_bytes": s.device_bytes, "device_budget": s.budget, "host_bytes": s.host_bytes},
            "placement": {"batch": s.batch, "decode_sequences": min(s.batch, self.workload.requests), "attn_micro_batch": s.micro, "expert_slots": s.residency.pools.get("expert", 0),
                          "resident_modules": len(s.residency.resident), "link_gbps": s.link_gbps,
                          "kv_blocks": s.kv_blocks, "kv_block_size": s.rcfg.kv_block_size,
                          "prefix_hit_rate": self.workload.prefix_hit_rate,
                          "fp8_residents_dequantized": s.fp8_residents[0],
                          "fp8_dequantized_extra_bytes": s.fp8_residents[1]},
            "alternatives": [c.summary() for c in self.alternatives], "considered": self.considered,
        }


def host_kv_limit(rcfg: RuntimeConfig) -> int:
    """Bytes the host KV cache may take: --host-kv-memory, else a share of the memory available now."""
    if rcfg.host_kv_memory is not None:
        return rcfg.host_kv_memory
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(available * HOST_SHARE)


def search(facts: ModelFacts, rcfg: RuntimeConfig, user: frozenset[str], machine: Machine, profile: Profile,
           workload: Workload, budget: int | None, host_kv: int) -> Plan:
    """The best predicted config that keeps the user's knobs and fits both budgets. Raises the
    runtime's own error when nothing fits (the knob it names is the one to change)."""
    candidates, last_error, limits = [], None, []
    host_cap = _batch_sizes(rcfg, user, workload, facts, host_kv, limits)
    for B in host_cap:
        for micro in _micro_batches(B, rcfg, user):
            for resident in _resident_counts(facts, rcfg, user, budget):
                for step_tokens, share in itertools.product(_step_tokens(B, rcfg, user, budget),
                                                            _cpu_attention_shares(rcfg, user, profile, budget)):
                    c = dataclasses.replace(rcfg, batch_size=B, attn_micro_batch=micro, resident_experts=resident,
                                            max_step_tokens=step_tokens, cpu_attention=share,
                                            host_kv_memory=_host_kv_memory(rcfg, user, B, host_kv, facts))
                    try:
                        s = setting(facts, c, machine, budget)
                    except DeviceBudgetError as exc:
                        last_error = exc
                        continue
                    candidates.append(Candidate(c, s, predict(facts, s, profile, machine, workload)))
    if not candidates:
        raise last_error or ValueError("no batch size fits the host memory for the KV cache; lower --max-seq-len "
                                       "or raise --host-kv-memory")
    candidates.sort(key=lambda c: -c.predicted.job_tok_s)
    best = candidates[0]
    if budget is not None and best.setting.device_bytes is not None:
        left = budget - best.setting.device_bytes
        if best.predicted.decode.bound == "link" and left < min((s.resident for s in facts.sizes.values()), default=0):
            limits.append(f"device memory: {left / 2**20:.1f} MiB left, so every streamed module crosses the link "
                          "each step")
    one = step_time(facts, best.setting, profile, machine, 1, workload.prompt_len + workload.new_tokens / 2)
    return Plan(best.rcfg, tuple(sorted(user & set(PLANNED))), workload, best, _distinct(candidates[1:], best),
                limits, len(candidates), min(one.seconds / best.predicted.decode.seconds, 1.0))


def _batch_sizes(rcfg: RuntimeConfig, user: frozenset[str], w: Workload, facts: ModelFacts, host_kv: int,
                 limits: list[str]) -> list[int]:
    if "batch_size" in user or rcfg.batching == "model":
        return [rcfg.batch_size] if "batch_size" in user else [max(rcfg.batch_size, w.requests)]
    from moegen.runtime.kv.sizing import kv_block_bytes

    blocks = host_kv // kv_block_bytes(facts.cfg, rcfg)
    per_seq = expected_blocks(w, rcfg.kv_block_size)
    most = max(1, min(w.requests, blocks // per_seq))
    if most < w.requests:
        limits.append(f"host memory: the KV cache of {format_bytes(host_kv)} holds {blocks} blocks, {most} sequences "
                      f"of the {per_seq * rcfg.kv_block_size} tokens each is expected to hold ({w.requests} requests)")
    sizes = {most} | {2**i for i in range(3, 20) if 2**i < most}
    return sorted(sizes, reverse=True)


def expected_blocks(w: Workload, block_size: int) -> int:
    """KV blocks a sequence is expected to hold at its end: its prompt and its cap, on average (the caps are what
    the workload expects; where all are equal, the runtime's admission adapts from the lengths it sees)."""
    return max(1, math.ceil((w.prompt_len + w.new_tokens) / block_size))


def _host_kv_memory(rcfg: RuntimeConfig, user: frozenset[str], B: int, host_kv: int, facts: ModelFacts) -> int | None:
    """The host KV cache's bytes: the user's; else the host's share, but no more than B sequences could ever
    hold (page-locked memory past that would stay idle)."""
    if "host_kv_memory" in user or rcfg.batching == "model":
        return rcfg.host_kv_memory
    from moegen.runtime.kv.sizing import kv_block_bytes

    return min(host_kv, B * math.ceil(rcfg.max_seq_len / rcfg.kv_block_size) * kv_block_bytes(facts.cfg, rcfg))


def _cpu_attention_shares(rcfg: RuntimeConfig, user: frozenset[str], profile: Profile, budget: int | None
                          ) -> tuple[float, ...]:
    """The user's share; else, where staged KV crosses a link (a device budget, module batching) and the host's
    attention is measured, every share in SHARES; else none."""
    if "cpu_attention" in user:
        return (rcfg.cpu_attention,)
    if rcfg.batching == "model" or budget is None or profile.host_attn is None or rcfg.kv_dtype == "fp8":
        return (0.0,)
    return SHARES


def _micro_batches(B: int, rcfg: RuntimeConfig, user: frozenset[str]) -> list[int]:
    if "attn_micro_batch" in user:
        return [rcfg.attn_micro_batch]
    return sorted({max(1, B >> i) for i in range(6)}, reverse=True)


def _step_tokens(B: int, rcfg: RuntimeConfig, user: frozenset[str], budget: int | None) -> list[int]:
    """The step's token budget as set, and (under a device budget) its floor: B - 1 decode tokens plus
    one longest prompt, which frees activation memory for a larger B or more slots."""
    if "max_step_tokens" in user or budget is None:
        return [rcfg.max_step_tokens]
    return sorted({rcfg.max_step_tokens, B - 1 + rcfg.max_seq_len}, reverse=True)


def _resident_counts(facts: ModelFacts, rcfg: RuntimeConfig, user: frozenset[str], budget: int | None) -> list:
    if "resident_experts" in user:
        return [rcfg.resident_experts]
    if budget is None or rcfg.batching == "model":
        return [None]  # everything fits (cpu without a budget), or the baseline policy as it is
    experts = sum(m.kind == "expert" for m in facts.sizes)
    counts = {0, experts} | {2**i for i in range(20) if 2**i < experts} | {experts * i // 8 for i in range(1, 8)}
    return [None] + sorted(counts)


def _distinct(rest: list[Candidate], best: Candidate, n: int = 5) -> list[Candidate]:
    """Runners-up that differ from the best and each other in what the run would do."""
    seen, out = {_shape(best)}, []
    for c in rest:
        if _shape(c) not in seen:
            seen.add(_shape(c))
            out.append(c)
        if len(out) == n:
            break
    return out


def _shape(c: Candidate) -> tuple:
    s = c.setting
    return s.batch, s.micro, s.residency.pools.get("expert", 0), len(s.residency.resident)
