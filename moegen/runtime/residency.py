"""What the streamable modules take, and which of them live on the device: the sizing rules that the runtime's
Placement and the planner both follow, so a plan's device bytes are the run's.

Streamable modules: attention[l], mlp[l] (a dense MLP, or the shared expert with its gate), expert[l][e].
A module with FP8 linears (`formats.fp8`) takes three sizes: its host block (FP8 elements and scales: what
each copy moves), its resident copy (dequantized once at start-up), and a slot (its block plus the run-dtype
working buffer its linears are dequantized into, right before use).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from typing import Literal

import torch

from moegen.formats import fp8
from moegen.models.weights import ModelWeights
from moegen.runtime.backend import DeviceBudgetError
from moegen.runtime.host_blocks import block_layout, named_tensors

Kind = Literal["attn", "mlp", "expert"]


@dataclass(frozen=True, slots=True)
class ModuleId:
    kind: Kind
    layer: int
    expert: int = -1  # experts only

    def __str__(self) -> str:
        return f"{self.kind}[{self.layer}]" + (f"[{self.expert}]" if self.kind == "expert" else "")


@dataclass(frozen=True, slots=True)
class ModuleSize:
    """One streamable module's bytes."""

    host: int  # its host block: what one copy of it moves over the link
    resident: int  # on the device for the whole run (FP8 linears dequantized to the run dtype)
    work: int  # the working buffer a slot holding it needs to dequantize its FP8 linears (0: none)


def module_sizes(weights: ModelWeights, dtype: torch.dtype) -> dict[ModuleId, ModuleSize]:
    """Every streamable module's sizes, with plain tensors in `dtype` (the runtime's)."""
    size = torch.empty((), dtype=dtype).element_size()
    sizes = {}
    for module, (unit, extra) in units_of(weights).items():
        _, host = block_layout(named_tensors(unit, extra, dtype))
        quantized = [v for f in fields(unit) if isinstance(v := getattr(unit, f.name), fp8.BlockFp8)]
        stored = sum(v.nbytes for v in quantized)  # their FP8 elements and scales
        work = sum(v.numel() for v in quantized) * size
        sizes[module] = ModuleSize(host=host, resident=host - stored + work, work=work)
    return sizes


@dataclass(frozen=True, slots=True)
class Residency:
    """Which modules live on the device for the whole run, and how many slots each streamed kind gets."""

    resident: tuple[ModuleId, ...]
    pools: dict[Kind, int]  # slots per kind that has streamed modules
    device_bytes: int  # what residents and slot pools take


def slot_bytes(sizes: dict[ModuleId, ModuleSize]) -> dict[Kind, int]:
    """Bytes of one slot of each kind: the kind's largest host block and its largest working buffer."""
    out: dict[Kind, tuple[int, int]] = {}
    for m, s in sizes.items():
        host, work = out.get(m.kind, (0, 0))
        out[m.kind] = (max(host, s.host), max(work, s.work))
    return {kind: host + work for kind, (host, work) in out.items()}


def choose_residency(sizes: dict[ModuleId, ModuleSize], free: int | None, expert_slots: int | None = None,
                     resident_experts: int | None = None) -> Residency:
    """The device's share of the streamable modules, from their sizes (bytes) and the budget left
    (`free`; None = unlimited): every kind's slot pool at its minimum (2, or --expert-slots), then
    residents, hot ones first (attention and dense/shared MLPs run for every token, an expert for a
    k/E share), then what is left of the budget to more expert slots. --resident-experts fixes how
    many experts stay (the first ones in layer order); --expert-slots alone streams every expert.
    Raises DeviceBudgetError when the asked-for residents don't fit. The runtime's Placement and
    the planner both place through this, so a plan's device bytes are the run's."""
    by_kind: dict[Kind, list[ModuleId]] = {}
    for module in sizes:
        by_kind.setdefault(module.kind, []).append(module)
    largest = slot_bytes(sizes)
    if free is None and expert_slots is None and resident_experts is None:
        return Residency(tuple(sizes), {}, sum(s.resident for s in sizes.values()))
    pools = {kind: min(2, len(mods)) for kind, mods in by_kind.items()}
    if expert_slots is not None and "expert" in pools:
        pools["expert"] = min(expert_slots, len(by_kind["expert"]))
    left = None if free is None else free - sum(pools[k] * largest[k] for k in pools)
    if left is not None and left < 0:
        need = sum(pools[k] * largest[k] for k in pools)
        raise DeviceBudgetError(
            f"the weight slots ({', '.join(f'{n} {k}' for k, n in pools.items())}) need {need / 2**20:.1f} MiB of "
            f"device memory, {free / 2**20:.1f} MiB are left beside lm_head, norms, routers, KV staging, activations "
            "and the launches' transient memory; raise --gpu-memory, or lower --expert-slots, --attn-micro-batch or "
            "--max-seq-len")
    resident: list[ModuleId] = []
    for kind in ("attn", "mlp", "expert"):
        mods = by_kind.get(kind, [])
        if kind == "expert" and (resident_experts is not None or expert_slots is not None):
            asked = mods[: resident_experts or 0]
            need = sum(sizes[m].resident for m in asked)
            if left is not None and need > left:
                raise DeviceBudgetError(
                    f"--resident-experts {len(asked)} needs {need / 2**20:.1f} MiB of device memory, {left / 2**20:.1f} "
                    "MiB are left beside the core, slots and other residents; lower --resident-experts or raise "
                    "--gpu-memory")
            resident += asked
            left = None if left is None else left - need
        else:
            for module in mods:
                if left is None or sizes[module].resident <= left:
                    resident.append(module)
                    left = None if left is None else left - sizes[module].resident
        if mods and all(m in resident for m in mods):  # nothing of this kind streams: its pool goes
            left = None if left is None else left + pools.pop(kind) * largest[kind]
    streamed = sum(m not in resident for m in by_kind.get("expert", []))
    if expert_slots is None and "expert" in pools and left is not None and streamed > pools["expert"]:
        pools["expert"] += int(max(0, min(streamed - pools["expert"], left // largest["expert"])))
    if "expert" in pools and streamed:
        pools["expert"] = min(pools["expert"], streamed)
    used = sum(sizes[m].resident for m in resident) + sum(pools[k] * largest[k] for k in pools)
    return Residency(tuple(resident), pools, used)


def minimum_device_bytes(weights: ModelWeights, dtype: torch.dtype, expert_slots: int | None) -> int:
    """What any placement needs on the device: the core plus each streamed kind's smallest slot pool."""
    sizes = module_sizes(weights, dtype)
    counts = Counter(m.kind for m in sizes)
    slots = {kind: min(expert_slots or 2, n) if kind == "expert" else min(2, n) for kind, n in counts.items()}
    largest = slot_bytes(sizes)
    return core_device_bytes(weights, dtype) + sum(slots[k] * largest[k] for k in slots)


def units_of(weights: ModelWeights) -> dict[ModuleId, tuple[object, dict | None]]:
    """Every streamable module: its weights dataclass and extra tensors (a shared expert's gate)."""
    units: dict[ModuleId, tuple[object, dict | None]] = {}
    for layer, lw in enumerate(weights.layers):
        units[ModuleId("attn", layer)] = (lw.attn, None)
        if lw.mlp is not None:
            units[ModuleId("mlp", layer)] = (lw.mlp, None)
        elif lw.moe.shared is not None:
            units[ModuleId("mlp", layer)] = (lw.moe.shared, {"shared_expert_gate": lw.moe.shared_expert_gate})
        if lw.moe is not None:
            for e, expert in enumerate(lw.moe.experts):
                units[ModuleId("expert", layer, e)] = (expert, None)
    return units


def core_device_bytes(weights: ModelWeights, dtype: torch.dtype) -> int:
    """What `_place_core` puts on the device: lm_head (or the tied embedding), norms, routers (their
    score-correction bias in its own dtype)."""
    size = torch.empty((), dtype=dtype).element_size()
    numel = weights.lm_head.numel() + weights.norm.numel()
    extra = 0
    for lw in weights.layers:
        numel += lw.input_layernorm.numel() + lw.post_attention_layernorm.numel()
        if lw.moe is not None:
            numel += lw.moe.router.gate.numel()
            bias = lw.moe.router.e_score_correction_bias
            extra += 0 if bias is None else bias.numel() * bias.element_size()
    return numel * size + extra
