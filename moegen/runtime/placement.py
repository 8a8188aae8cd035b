"""Where each module's weights live: host blocks, the device-resident set, and per-type slot pools.

Every streamable module (attention[l], mlp[l] — dense MLP or shared expert —, expert[l][e]) is
one contiguous host block, so its copy is one large transfer (except a resident on a backend that
reorders linear weights for its matmul, the cpu's oneDNN: it is never copied, so it has no host copy). At start-up the placement puts
the core (norms, routers, lm_head; the embedding only when tied to lm_head) and whatever else fits
on the device, and sizes a
slot pool per module type for the rest. A non-resident module is used through a *ticket*: the
prefetcher fills a free slot on the weights copy stream and records a ready event; the consumer's
compute waits on it; the consumer returns the slot with its compute's event, which the next copy
into that slot waits on. The device orders the work; the host never blocks on a copy.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from moegen.runtime.backend import Backend, DeviceBudgetError, Event
from moegen.runtime.host_blocks import HostBlock, host_blocks, named_tensors
from moegen.models.weights import LINEAR_FIELDS, ModelWeights, RouterWeights, tensors_of

Kind = Literal["attn", "mlp", "expert"]


@dataclass(frozen=True, slots=True)
class ModuleId:
    kind: Kind
    layer: int
    expert: int = -1  # experts only

    def __str__(self) -> str:
        return f"{self.kind}[{self.layer}]" + (f"[{self.expert}]" if self.kind == "expert" else "")


@dataclass(slots=True)
class CoreWeights:
    """What is always on the device."""

    embed_tokens: Tensor  # [V, H]; in host memory unless tied to lm_head (the lookup runs on the host)
    lm_head: Tensor  # [V, H]
    norm: Tensor  # [H]
    input_layernorm: list[Tensor]  # [H] per layer
    post_attention_layernorm: list[Tensor]  # [H] per layer
    routers: list[RouterWeights | None]  # per layer; None for dense layers


@dataclass(slots=True)
class Ticket:
    """The right to use a module's weights on the device for one step."""

    weights: object  # the unit's weights dataclass, on the device
    gate: Tensor | None  # Qwen2-MoE shared_expert_gate, when the module is a gated shared expert
    ready: Event | None  # the copy that filled the slot (None: resident)
    slot: int = -1  # index in its pool (-1: resident)
    flow: int = 0  # trace flow from the copy to the first compute that uses it (0: none)


class SlotPool:
    """`count` device buffers big enough for the largest module of one kind."""

    def __init__(self, backend: Backend, kind: Kind, count: int, numel: int, dtype: torch.dtype):
        self.kind, self.count = kind, count
        self.buffers = [backend.alloc((numel,), dtype, f"{count} {kind} slot(s)") for _ in range(count)]
        self._free: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()
        self.reset()

    async def take(self) -> tuple[int, Event | None]:
        """A free slot and the event its last user's compute recorded (copies into it must wait on it)."""
        return await self._free.get()

    def give(self, slot: int, last_use: Event | None) -> None:
        self._free.put_nowait((slot, last_use))

    def reset(self) -> None:
        self._free = asyncio.Queue()
        for i in range(self.count):
            self._free.put_nowait((i, None))


class Placement:
    """Decides residency at start-up; hands out tickets; fills slots for the prefetcher."""

    def __init__(self, backend: Backend, weights: ModelWeights, dtype: torch.dtype, kv_and_activation_bytes: int,
                 expert_slots: int | None, resident_experts: int | None = None):
        self.backend, self.dtype = backend, dtype
        self.core = self._place_core(weights)
        backend.reserve(kv_and_activation_bytes, "KV staging, activations and the launches' transient memory")
        size = torch.empty((), dtype=dtype).element_size()
        numels = module_numels(weights)
        free = None if backend.budget is None else backend.budget - backend.counters.device_bytes
        choice = choose_residency({m: n * size for m, n in numels.items()}, free, expert_slots, resident_experts)
        # Residents whose linears the backend reorders never need a host copy: they get none.
        packed = set(choice.resident) if backend.packs_linears(dtype) else set()
        units = _units(weights)
        self.blocks: dict[ModuleId, HostBlock] = host_blocks(backend, units, numels, dtype, packed)
        self.resident: dict[ModuleId, Ticket] = {}
        self.resident_modules = frozenset(choice.resident)
        self.pools: dict[Kind, SlotPool] = {}
        by_kind: dict[Kind, list[ModuleId]] = {}
        for module in self.blocks:
            by_kind.setdefault(module.kind, []).append(module)
        for kind, count in choice.pools.items():
            self.pools[kind] = self._pool(kind, count, by_kind[kind])
        for module in choice.resident:
            if module in packed:
                self._pack_resident(module, *units[module])
            else:
                self._make_resident(module)
        self._tickets: dict[tuple[int, ModuleId], asyncio.Future[Ticket | None]] = {}
        self.fills: Counter[ModuleId] = Counter()  # copies into slots, per module, over the engine's life
        self.skips: Counter[ModuleId] = Counter()  # copies avoided because routing gave the module no tokens

    def _place_core(self, weights: ModelWeights) -> CoreWeights:
        """Norms, routers and lm_head always live on the device. The embedding stays in host memory
        (a lookup needs T rows, not the V-row table: the rows cross the link, `embed_on_host`),
        unless it is also the lm_head."""
        def put(t: Tensor | None, what: str, keep_dtype: bool = False, place=self.backend.place) -> Tensor | None:
            if t is None:
                return None
            return place(t, t.dtype if keep_dtype else self.dtype, what,
                         "raise --gpu-memory: lm_head, norms and routers always live on the device")

        tied = weights.lm_head is weights.embed_tokens
        embed = put(weights.embed_tokens, "the embedding (tied to lm_head)") if tied else weights.embed_tokens
        self.embed_on_host = not tied
        routers = [None if lw.moe is None else RouterWeights(
            gate=put(lw.moe.router.gate, "a router"),
            e_score_correction_bias=put(lw.moe.router.e_score_correction_bias, "a router bias", keep_dtype=True))
            for lw in weights.layers]
        return CoreWeights(
            embed_tokens=embed,
            lm_head=embed if tied else put(weights.lm_head, "lm_head", place=self.backend.place_linear),
            norm=put(weights.norm, "norms"),
            input_layernorm=[put(lw.input_layernorm, "norms") for lw in weights.layers],
            post_attention_layernorm=[put(lw.post_attention_layernorm, "norms") for lw in weights.layers],
            routers=routers,
        )

    def _pool(self, kind: Kind, count: int, modules: list[ModuleId]) -> SlotPool:
        return SlotPool(self.backend, kind, count, max(self.blocks[m].numel for m in modules), self.dtype)

    def _make_resident(self, module: ModuleId) -> None:
        block = self.blocks[module]
        weights, gate = block.views(self.backend.place(block.flat, self.dtype, f"resident {module}"))
        self.resident[module] = Ticket(weights=weights, gate=gate, ready=None)

    def _pack_resident(self, module: ModuleId, unit, extra: dict | None) -> None:
        """A resident whose linears the backend reorders (`Backend.place_linear`): placed tensor by
        tensor from the loaded unit, whose fields then hold the placed tensors (as `pack` leaves them
        holding views of the arena), so the loaded tensors are freed and the host holds the module once."""
        what = f"resident {module}"
        linears = LINEAR_FIELDS[type(unit)]
        for f in fields(unit):
            t = getattr(unit, f.name)
            if isinstance(t, Tensor):
                place = self.backend.place_linear if f.name in linears else self.backend.place
                setattr(unit, f.name, place(t, self.dtype, what))
        gate = (extra or {}).get("shared_expert_gate")
        gate = None if gate is None else self.backend.place(gate, self.dtype, what)
        self.resident[module] = Ticket(weights=unit, gate=gate, ready=None)

    def reset(self, after_a_run: bool) -> None:
        """Before a run: every slot free, no ticket outstanding (an earlier run may have ended with
        slots filled for a step it never ran, or a failure with work in flight): `after_a_run`, the device
        finishes what was issued first, so no new copy can overwrite a slot something still reads. (A first
        run has nothing to wait for: start-up synchronized, and a run sync-checked from its start then sees
        no device-wide sync.)"""
        if after_a_run:
            self.backend.synchronize()
        self._tickets.clear()
        for pool in self.pools.values():
            pool.reset()

    def close(self) -> None:
        """The engine closed: its slot buffers and resident copies go (the host blocks stay with the weights;
        `streamed` still answers)."""
        for pool in self.pools.values():
            pool.buffers.clear()
        self.resident.clear()

    def unclaimed(self) -> list[tuple[ModuleId, Ticket]]:
        """Filled slots nobody acquired (at the end of a run: fills for a step that never came)."""
        return [(module, fut.result()) for (_, module), fut in self._tickets.items()
                if fut.done() and not fut.cancelled() and fut.result() is not None]

    # -- per step -------------------------------------------------------------------------------

    def streamed(self, module: ModuleId) -> bool:
        return module not in self.resident_modules

    def _future(self, step: int, module: ModuleId) -> asyncio.Future:
        key = (step, module)
        if key not in self._tickets:
            self._tickets[key] = asyncio.get_running_loop().create_future()
        return self._tickets[key]

    async def acquire(self, step: int, module: ModuleId) -> Ticket | None:
        """The module's weights for `step`; None if the prefetcher skipped it (it had no tokens)."""
        if module in self.resident:
            return self.resident[module]
        ticket = await self._future(step, module)
        del self._tickets[(step, module)]
        return ticket

    def release(self, ticket: Ticket | None, module: ModuleId, last_use: Event | None) -> None:
        """Return a streamed module's slot; copies into it wait for `last_use` (its compute's event)."""
        if ticket is not None and ticket.slot >= 0:
            self.pools[module.kind].give(ticket.slot, last_use)

    async def fill(self, step: int, module: ModuleId) -> None:
        """Prefetcher: copy `module` into a free slot on the weights copy stream (waits for a slot only)."""
        pool = self.pools[module.kind]
        slot, last_use = await pool.take()
        self.fills[module] += 1
        stream = self.backend.h2d_weights
        if last_use is not None:
            stream.wait_event(last_use)  # the device waits for the slot's last compute, not the host
        block = self.blocks[module]
        dst = pool.buffers[slot][: block.flat.numel()]
        label, flow = None, 0
        if self.backend.recorder is not None:
            from moegen.trace.slices import Label

            flow = self.backend.recorder.new_flow()
            label = Label(f"copy {module}", {"layer": module.layer, "expert": module.expert, "bytes": block.nbytes,
                                             "step": step, "slot": slot}, flows_out=(flow,))
        ready = self.backend.copy(stream, dst, block.flat, label)
        weights, gate = block.views(dst)
        self._future(step, module).set_result(Ticket(weights=weights, gate=gate, ready=ready, slot=slot, flow=flow))

    def skip(self, step: int, module: ModuleId) -> None:
        """Prefetcher: routing gave `module` no tokens this step, so it is never copied."""
        self.skips[module] += 1
        self._future(step, module).set_result(None)


@dataclass(frozen=True, slots=True)
class Residency:
    """Which modules live on the device for the whole run, and how many slots each streamed kind gets."""

    resident: tuple[ModuleId, ...]
    pools: dict[Kind, int]  # slots per kind that has streamed modules
    device_bytes: int  # what residents and slot pools take


def choose_residency(sizes: dict[ModuleId, int], free: int | None, expert_slots: int | None = None,
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
    largest = {kind: max(sizes[m] for m in mods) for kind, mods in by_kind.items()}
    if free is None and expert_slots is None and resident_experts is None:
        return Residency(tuple(sizes), {}, sum(sizes.values()))
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
            need = sum(sizes[m] for m in asked)
            if left is not None and need > left:
                raise DeviceBudgetError(
                    f"--resident-experts {len(asked)} needs {need / 2**20:.1f} MiB of device memory, {left / 2**20:.1f} "
                    "MiB are left beside the core, slots and other residents; lower --resident-experts or raise "
                    "--gpu-memory")
            resident += asked
            left = None if left is None else left - need
        else:
            for module in mods:
                if left is None or sizes[module] <= left:
                    resident.append(module)
                    left = None if left is None else left - sizes[module]
        if mods and all(m in resident for m in mods):  # nothing of this kind streams: its pool goes
            left = None if left is None else left + pools.pop(kind) * largest[kind]
    streamed = sum(m not in resident for m in by_kind.get("expert", []))
    if expert_slots is None and "expert" in pools and left is not None and streamed > pools["expert"]:
        pools["expert"] += int(max(0, min(streamed - pools["expert"], left // largest["expert"])))
    if "expert" in pools and streamed:
        pools["expert"] = min(pools["expert"], streamed)
    used = sum(sizes[m] for m in resident) + sum(pools[k] * largest[k] for k in pools)
    return Residency(tuple(resident), pools, used)


def minimum_device_bytes(weights: ModelWeights, dtype: torch.dtype, expert_slots: int | None) -> int:
    """What any placement needs on the device: the core plus each streamed kind's smallest slot pool."""
    size = torch.empty((), dtype=dtype).element_size()
    core = weights.lm_head.numel() + weights.norm.numel()  # the embedding stays on the host unless tied
    largest: dict[Kind, int] = {}
    counts: Counter[Kind] = Counter()
    for lw in weights.layers:
        core += lw.input_layernorm.numel() + lw.post_attention_layernorm.numel()
        units: list[tuple[Kind, int]] = [("attn", _numel(lw.attn))]
        if lw.mlp is not None:
            units.append(("mlp", _numel(lw.mlp)))
        elif lw.moe.shared is not None:
            gate = lw.moe.shared_expert_gate
            units.append(("mlp", _numel(lw.moe.shared) + (0 if gate is None else gate.numel())))
        if lw.moe is not None:
            core += _numel(lw.moe.router)
            units += [("expert", _numel(e)) for e in lw.moe.experts]
        for kind, numel in units:
            largest[kind] = max(largest.get(kind, 0), numel)
            counts[kind] += 1
    slots = {kind: min(expert_slots or 2, n) if kind == "expert" else min(2, n) for kind, n in counts.items()}
    return (core + sum(slots[k] * largest[k] for k in slots)) * size


def _numel(unit) -> int:
    return sum(t.numel() for t in tensors_of(unit))


def _units(weights: ModelWeights) -> dict[ModuleId, tuple[object, dict | None]]:
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


def module_numels(weights: ModelWeights) -> dict[ModuleId, int]:
    """Elements of each streamable module's host block (its bytes: times the runtime dtype's size)."""
    return {m: sum(t.numel() for t in named_tensors(*u).values()) for m, u in _units(weights).items()}


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
