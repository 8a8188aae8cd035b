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
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from moegen.formats import fp8
from moegen.runtime.backend import Backend, Event
from moegen.runtime.host_blocks import HostBlock, host_blocks
from moegen.runtime.residency import Kind, ModuleId, choose_residency, module_sizes, units_of
from moegen.models.weights import LINEAR_FIELDS, ModelWeights, RouterWeights

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
    quantized: object | None = None  # the slot's unit with FP8 linears, which `weights` (views of the slot's
    # working buffer) are dequantized from by the first launch that uses it; None: nothing left to dequantize

    def unpack(self):
        """The weights, ready to compute with. Called inside a launch (on the compute stream, after the copy):
        the first launch dequantizes the slot's FP8 linears into its working buffer."""
        if self.quantized is not None:
            fp8.dequantize_into(self.quantized, self.weights)
            self.quantized = None
        return self.weights


class SlotPool:
    """`count` device buffers big enough for the largest module of one kind (its host block's bytes), each
    with a working buffer of the run dtype where a module's FP8 linears are dequantized (when any has some)."""

    def __init__(self, backend: Backend, kind: Kind, count: int, nbytes: int, work_numel: int, dtype: torch.dtype):
        self.kind, self.count = kind, count
        what = f"{count} {kind} slot(s)"
        self.buffers = [backend.alloc((nbytes,), torch.uint8, what) for _ in range(count)]
        self.works = [backend.alloc((work_numel,), dtype, what) if work_numel else None for _ in range(count)]
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
        free = None if backend.budget is None else backend.budget - backend.counters.device_bytes
        choice = choose_residency(module_sizes(weights, dtype), free, expert_slots, resident_experts)
        # Residents whose linears the backend reorders never need a host copy: they get none.
        packed = set(choice.resident) if backend.packs_linears(dtype) else set()
        units = units_of(weights)
        self.blocks: dict[ModuleId, HostBlock] = host_blocks(backend, units, packed, dtype)
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
        return SlotPool(self.backend, kind, count, max(self.blocks[m].nbytes for m in modules),
                        max(self.blocks[m].work_numel for m in modules), self.dtype)

    def _make_resident(self, module: ModuleId) -> None:
        """A resident copied from its host block; one with FP8 linears is dequantized once, on the host, and
        placed tensor by tensor (a resident's launches then never dequantize)."""
        block, what = self.blocks[module], f"resident {module}"
        if not block.work_numel:
            weights, gate = block.views(self.backend.place(block.flat, torch.uint8, what))
        else:
            weights, gate = block.views(block.flat)
            weights = fp8.plain(weights, self.dtype)
            for f in fields(weights):
                if isinstance(t := getattr(weights, f.name), Tensor):
                    setattr(weights, f.name, self.backend.place(t, self.dtype, what))
            gate = None if gate is None else self.backend.place(gate, self.dtype, what)
        self.resident[module] = Ticket(weights=weights, gate=gate, ready=None)

    def _pack_resident(self, module: ModuleId, unit, extra: dict | None) -> None:
        """A resident whose linears the backend reorders (`Backend.place_linear`): placed tensor by
        tensor from the loaded unit, whose plain fields then hold the placed tensors (as `pack` leaves them
        holding views of the arena), so the loaded tensors are freed and the host holds the module once. FP8
        fields are placed dequantized (a resident's launches never dequantize) and stay FP8 in the loaded
        unit, so a later engine on the same weights finds them as the checkpoint stores them."""
        what = f"resident {module}"
        linears = LINEAR_FIELDS[type(unit)]
        placed = {}
        for f in fields(unit):
            t = getattr(unit, f.name)
            plain = fp8.dequantize(t, self.dtype) if isinstance(t, fp8.BlockFp8) else t
            if isinstance(plain, Tensor):
                place = self.backend.place_linear if f.name in linears else self.backend.place
                placed[f.name] = place(plain, self.dtype, what)
                if plain is t:
                    setattr(unit, f.name, placed[f.name])
        gate = (extra or {}).get("shared_expert_gate")
        gate = None if gate is None else self.backend.place(gate, self.dtype, what)
        self.resident[module] = Ticket(weights=replace(unit, **placed), gate=gate, ready=None)

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
        dst = pool.buffers[slot][: block.nbytes]
        label, flow = None, 0
        if self.backend.recorder is not None:
            from moegen.trace.slices import Label

            flow = self.backend.recorder.new_flow()
            label = Label(f"copy {module}", {"layer": module.layer, "expert": module.expert, "bytes": block.nbytes,
                                             "step": step, "slot": slot}, flows_out=(flow,))
        ready = self.backend.copy(stream, dst, block.flat, label)
        weights, gate = block.views(dst)
        quantized = None
        if block.work_numel:
            weights, quantized = fp8.work_views(weights, pool.works[slot]), weights
        self._future(step, module).set_result(Ticket(weights=weights, gate=gate, ready=ready, slot=slot, flow=flow,
                                                     quantized=quantized))

    def skip(self, step: int, module: ModuleId) -> None:
        """Prefetcher: routing gave `module` no tokens this step, so it is never copied."""
        self.skips[module] += 1
        self._future(step, module).set_result(None)
