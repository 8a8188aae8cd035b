"""A step's small host tensors (token ids, the micro-batches' index tensors, each sequence's last
token, the sampling parameters) onto the device in one copy from page-locked memory.

A `.to(device)` of a pageable host tensor is a copy the host waits for (CUDA stages pageable memory
through a bounce buffer): a dozen of them per step, each inside a launch, would serialise the host
with the device. Instead the tensors are laid end to end (8-byte aligned) in one page-locked
buffer, copied once on the KV stream, and the step uses views of the device copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moegen.runtime.backend import Backend, Event
from moegen.runtime.step import Step

ALIGN = 8  # bytes: every dtype's view of the buffer starts at a multiple of its element size


def step_input_bytes(batch: int, max_step_tokens: int) -> int:
    """The most bytes a step's inputs take: per sequence at most 3 + 6 int64s (each micro-batch's slots,
    past and new lengths; last token, sampling), per token 4 (positions, sequence, index, id), and
    alignment for at most 6 tensors per micro-batch (at most one micro-batch per sequence) and 8 more."""
    return 8 * (9 * batch + 4 * max_step_tokens) + ALIGN * (6 * batch + 8)


class StepInputs:
    """One page-locked host buffer and its device twin, sized for the largest step."""

    def __init__(self, backend: Backend, nbytes: int):
        self.backend = backend
        self.host = backend.host_buffer((nbytes,), torch.uint8, "step inputs")
        self.device = torch.empty(nbytes, dtype=torch.uint8, device=backend.device)
        self.sent: Event | None = None  # the last step's copy (its source is overwritten by the next step)

    async def send(self, step: Step, ids: Tensor, label=None) -> tuple[Event, Tensor]:
        """Copy `step`'s inputs and `ids` [T] to the device; the step then holds device views. Returns the
        copy's event (its launches must wait for it) and the device ids."""
        tensors = step.inputs() + [ids]
        if self.sent is not None:
            await self.backend.wait(self.sent)  # a step ago: long done
        offsets, end = [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            if end + nbytes > len(self.host):
                raise RuntimeError(f"a step's inputs need more than the {len(self.host)} bytes sized for them")
            self.host[end: end + nbytes].copy_(t.reshape(-1).view(torch.uint8))
            offsets.append(end)
            end += -(-nbytes // ALIGN) * ALIGN
        src, dst = self.host[:end], self.device[:end]
        self.sent = self.backend.submit_copy(self.backend.h2d_kv, lambda: dst.copy_(src, non_blocking=True), end,
                                             label)
        views = [self.device[o: o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                 for o, t in zip(offsets, tensors)]
        step.use_inputs(views[:-1])
        return self.sent, views[-1]
