"""Host blocks: every streamable module's tensors packed end to end into one host arena, allocated at
its exact size and page-locked once by the backend, so each module's copy to the device is one large
transfer. Weights an earlier engine packed are still views of its arena, and a later engine uses that
arena again as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from moegen.models.linear import plain
from moegen.runtime.backend import Backend


@dataclass(slots=True)
class HostBlock:
    """One module's tensors packed into one flat host tensor; `layout` rebuilds them as views."""

    flat: Tensor | None  # [numel] elements, host (pinned on cuda); None: resident with its linears
    # reordered for the backend's matmul (`Backend.packs_linears`), so never copied and not kept here
    layout: tuple[tuple[str, int, tuple[int, ...]], ...]  # (field, offset, shape) of each tensor
    cls: type  # the weights dataclass of the unit (GQAWeights, MLAWeights, MLPWeights)
    numel: int  # elements of all its tensors
    nbytes: int  # in the runtime dtype

    def views(self, flat: Tensor):
        """The unit's weights dataclass over `flat` (this block, or a device slot holding its copy)."""
        parts = {name: flat[off: off + torch.Size(shape).numel()].view(shape) for name, off, shape in self.layout}
        own = {f.name for f in fields(self.cls)}
        weights = self.cls(**{k: v for k, v in parts.items() if k in own})
        return weights, parts.get("shared_expert_gate")


def named_tensors(unit, extra: dict[str, Tensor | None] | None = None) -> dict[str, Tensor]:
    tensors = {f.name: getattr(unit, f.name) for f in fields(unit)} | (extra or {})
    return {k: v for k, v in tensors.items() if isinstance(v, Tensor)}


def _layout(tensors: dict[str, Tensor]) -> tuple[tuple[tuple[str, int, tuple[int, ...]], ...], int]:
    """(field, offset, shape) of each of a module's tensors laid end to end in its block, and its elements."""
    layout, off = [], 0
    for name, t in tensors.items():
        layout.append((name, off, tuple(t.shape)))
        off += t.numel()
    return tuple(layout), off


def pack(arena: Tensor, unit, extra: dict[str, Tensor | None] | None = None) -> HostBlock:
    """Move one module's tensors into `arena` (a slice of the host arena of exactly its size): each
    field of `unit` becomes a view of the arena, so the loaded tensor is freed as soon as it is
    packed and the host never holds the model twice."""
    tensors = named_tensors(unit, extra)
    layout, numel = _layout(tensors)
    own = {f.name for f in fields(unit)}
    for (name, off, shape), t in zip(layout, tensors.values()):
        part = arena[off: off + t.numel()]
        part.copy_(plain(t).reshape(-1))  # plain: a unit an earlier engine reordered (`Placement._pack_resident`)
        if name in own:
            setattr(unit, name, part.view(shape))
    return HostBlock(flat=arena, layout=layout, cls=type(unit), numel=numel, nbytes=numel * arena.element_size())


def host_blocks(backend: Backend, units: dict, numels: dict, dtype: torch.dtype, packed: set) -> dict:
    """module -> its HostBlock: every streamable module (`units`: module -> (weights dataclass, extra tensors);
    `numels`: module -> elements) in one host arena at its exact size, page-locked once by the backend; the
    `packed` ones (residents placed by `Placement._pack_resident`) get a block without a host copy. Weights an
    earlier engine packed are still views of its arena: that arena is used again as it is, so a second
    engine on the same weights (the bench's model-based run) allocates no second copy of the model."""
    size = torch.empty((), dtype=dtype).element_size()
    offsets = _packed_before(units, packed, dtype)
    if offsets is None:
        arena = backend.host_buffer((sum(n for m, n in numels.items() if m not in packed),), dtype, "the weight arena")
    else:
        arena, offsets = offsets
        backend.lock_host(arena, "the weight arena")
    blocks, off = {}, 0
    for module, (unit, extra) in units.items():
        n = numels[module]
        if module in packed:
            blocks[module] = HostBlock(flat=None, layout=(), cls=type(unit), numel=n, nbytes=n * size)
        elif offsets is not None:
            layout, _ = _layout(named_tensors(unit, extra))
            first = offsets[module]
            blocks[module] = HostBlock(flat=arena[first: first + n], layout=layout, cls=type(unit), numel=n,
                                       nbytes=n * size)
        else:
            blocks[module] = pack(arena[off: off + n], unit, extra)
            off += n
    return blocks


def _packed_before(units: dict, packed: set, dtype: torch.dtype) -> tuple[Tensor, dict] | None:
    """(the arena, each module's first element in it) when every module outside `packed` still lies in one
    arena as `pack` laid it out (its tensors contiguous, end to end, in `dtype`); else None."""
    storage, offsets = None, {}
    for module, (unit, extra) in units.items():
        if module in packed:
            continue
        tensors = list(named_tensors(unit, extra).values())
        if any(t.is_mkldnn or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
            return None
        if storage is None:
            storage = tensors[0].untyped_storage()
        first = next_offset = tensors[0].storage_offset()
        for t in tensors:
            if t.untyped_storage().data_ptr() != storage.data_ptr() or t.storage_offset() != next_offset:
                return None
            next_offset += t.numel()
        offsets[module] = first
    if storage is None:
        return None
    arena = torch.empty(0, dtype=dtype).set_(storage, 0, (storage.nbytes() // torch.empty((), dtype=dtype).element_size(),))
    return arena, offsets
