"""Host blocks: every streamable module's tensors packed end to end into one host arena of bytes, allocated at
its exact size and page-locked once by the backend, so each module's copy to the device is one large
transfer. A block holds its tensors as they are kept: run-dtype tensors, and a quantized linear's FP8
elements and scales (`formats.fp8`: the copy moves exactly those bytes). Weights an earlier engine packed are
still views of its arena, and a later engine uses that arena again as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from moegen.formats import fp8
from moegen.models.linear import plain
from moegen.runtime.backend import Backend

ALIGN = 64  # bytes: each block starts on this boundary in the arena (and so in a slot)


@dataclass(frozen=True, slots=True)
class Part:
    """One tensor of a block: where its bytes lie and what they are."""

    name: str  # the unit's field (a quantized field's scales: the field + fp8.SCALE_SUFFIX)
    offset: int  # bytes from the block's start
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


@dataclass(slots=True)
class HostBlock:
    """One module's tensors packed into one flat host byte tensor; `layout` rebuilds them as views."""

    flat: Tensor | None  # [nbytes] uint8, host (pinned on cuda); None: resident with its linears
    # reordered for the backend's matmul (`Backend.packs_linears`), so never copied and not kept here
    layout: tuple[Part, ...]
    cls: type  # the weights dataclass of the unit (GQAWeights, MLAWeights, MLPWeights)
    nbytes: int  # what its copy moves
    work_numel: int  # run-dtype elements its quantized linears take dequantized (0: none quantized)

    def views(self, flat: Tensor):
        """The unit's weights dataclass over `flat` (this block's bytes, or a device slot holding its copy):
        quantized fields as BlockFp8 over the FP8 bytes; and the shared expert gate, if any."""
        parts = fp8.assemble({p.name: flat[p.offset: p.offset + p.nbytes].view(p.dtype).view(p.shape)
                              for p in self.layout})
        own = {f.name for f in fields(self.cls)}
        weights = self.cls(**{k: v for k, v in parts.items() if k in own})
        return weights, parts.get("shared_expert_gate")


def named_tensors(unit, extra: dict[str, Tensor | None] | None = None, dtype: torch.dtype | None = None
                  ) -> dict[str, Tensor]:
    """A module's tensors by part name: each field's tensor (in `dtype`, when given), a quantized field's FP8
    elements and scales as they are."""
    values = {f.name: getattr(unit, f.name) for f in fields(unit)} | (extra or {})
    return {k: t for name, v in values.items() if v is not None for k, t in fp8.parts(name, v, dtype).items()}


def block_layout(tensors: dict[str, Tensor]) -> tuple[tuple[Part, ...], int]:
    """The parts of a module's tensors laid end to end, widest elements first (so every part starts on a
    multiple of its element size and no byte is padding), and the block's bytes."""
    layout, off = [], 0
    for name, t in sorted(tensors.items(), key=lambda kv: -kv[1].element_size()):
        layout.append(Part(name, off, tuple(t.shape), t.dtype))
        off += t.numel() * t.element_size()
    return tuple(layout), off


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def pack(arena: Tensor, unit, tensors: dict[str, Tensor]) -> HostBlock:
    """Move one module's tensors into `arena` (a byte slice of the host arena of at least its size): each
    field of `unit` becomes a view of the arena, so the loaded tensor is freed as soon as it is packed and the
    host never holds the model twice."""
    layout, nbytes = block_layout(tensors)
    for part in layout:
        # plain: a unit an earlier engine reordered (`Placement._pack_resident`)
        arena[part.offset: part.offset + part.nbytes].view(part.dtype).copy_(plain(tensors[part.name]).reshape(-1))
    block = HostBlock(flat=arena[:nbytes], layout=layout, cls=type(unit), nbytes=nbytes, work_numel=fp8.work_numel(unit))
    packed, _ = block.views(block.flat)
    for f in fields(unit):
        if getattr(unit, f.name) is not None:
            setattr(unit, f.name, getattr(packed, f.name))
    return block


def host_blocks(backend: Backend, units: dict, packed: set, dtype: torch.dtype) -> dict:
    """module -> its HostBlock: every streamable module (`units`: module -> (weights dataclass, extra tensors))
    in one host byte arena (plain tensors in `dtype`), each block on an ALIGN boundary, page-locked once by the backend; the `packed`
    ones (residents placed by `Placement._pack_resident`) get a block without a host copy. Weights an earlier
    engine packed are still views of its arena: that arena is used again as it is, so a second engine on the
    same weights (the bench's model-based run) allocates no second copy of the model."""
    tensors = {m: named_tensors(unit, extra, dtype) for m, (unit, extra) in units.items()}
    layouts = {m: block_layout(t) for m, t in tensors.items()}
    reused = _packed_before(tensors, layouts, packed)
    if reused is None:
        total = sum(aligned(n) for m, (_, n) in layouts.items() if m not in packed)
        arena = backend.host_buffer((total,), torch.uint8, "the weight arena")
    else:
        arena, starts = reused
        backend.lock_host(arena, "the weight arena")
    blocks, off = {}, 0
    for module, (unit, extra) in units.items():
        layout, nbytes = layouts[module]
        work = fp8.work_numel(unit)
        named = tensors.pop(module)  # once packed, nothing but the arena may hold the module's bytes
        if module in packed:
            blocks[module] = HostBlock(flat=None, layout=layout, cls=type(unit), nbytes=nbytes, work_numel=work)
        elif reused is not None:
            first = starts[module]
            blocks[module] = HostBlock(flat=arena[first: first + nbytes], layout=layout, cls=type(unit), nbytes=nbytes,
                                       work_numel=work)
        else:
            blocks[module] = pack(arena[off: off + nbytes], unit, named)
            off += aligned(nbytes)
    return blocks


def _packed_before(tensors: dict, layouts: dict, packed: set) -> tuple[Tensor, dict] | None:
    """(the arena as bytes, each module's first byte in it) when every module outside `packed` still lies in one
    arena as `pack` laid it out (each part a contiguous host view at its layout's offset); else None."""
    storage, starts = None, {}
    for module, named in tensors.items():
        if module in packed:
            continue
        layout, _ = layouts[module]
        if any(t.is_mkldnn or t.device.type != "cpu" or not t.is_contiguous() for t in named.values()):
            return None
        if storage is None:
            storage = next(iter(named.values())).untyped_storage()
        first = None
        for part in layout:
            t = named[part.name]
            at = t.storage_offset() * t.element_size()
            first = at - part.offset if first is None else first
            if t.untyped_storage().data_ptr() != storage.data_ptr() or at != first + part.offset:
                return None
        starts[module] = first
    if storage is None:
        return None
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),)), starts
