"""KV staging: a micro-batch's cached KV of one layer from its blocks in the host KV cache onto the device, and
its new entries back into their blocks, in a number of copies that does not grow with B.

One path on every backend, by block index (a micro-batch's sequences hold any blocks of the paged host cache):
  1. gather: a host worker (`Backend.host_gather`) gathers each sequence's blocks, up to the micro-batch's
     longest context, into a page-locked staging buffer laid out densely as [b, S', ...] (one index_select of
     b x S'/block_size blocks per tensor);
  2. stage: one host-to-device copy of that buffer into the slot's device buffer (the KV stream);
  3. the attention launch reads and extends the device buffer, then gathers its new entries into a
     dense [t, ...] device buffer;
  4. write back: one device-to-host copy of those into a page-locked buffer (the D2H stream);
  5. scatter: a second host worker (`Backend.host_scatter`) puts them into their blocks' positions.
Why a host gather rather than a device-side gather over mapped host memory: it is plain torch on
both backends (the cpu backend runs the same code, so CI checks it), the link then carries large
contiguous DMA transfers, and the host's cost is one pass over the staged bytes on a worker thread
with torch's intra-op threads, beside the device's work. Two slots alternate, so micro-batch i+1's
gather and copy run while micro-batch i attends. A staging gather waits only for the previous
step's scatters of its layer (the blocks it reads must be home), never for this step's.
Where the device is host memory (the cpu backend with no device budget) a slot's device buffers are its host
buffers: steps 2 and 4 vanish, the launch reads the gathered buffer where it is.
With --kv-dtype fp8 every buffer above holds e4m3 (`kv.fp8`); each slot has work buffers in the run dtype too,
which the launch dequantizes the staged entries into and reads and extends, and quantizes its new entries from.

Letters: b sequences of a micro-batch, S' its longest context rounded up to whole blocks, t its new tokens,
N blocks in the host cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from moegen.config import GQAConfig, MLAConfig
from moegen.formats.fp8 import FP8
from moegen.models.kv_cache import LayerKV, layer_kv_numel, layer_kv_over
from moegen.runtime.backend import Backend, Event
from moegen.runtime.kv.fp8 import KVFp8
from moegen.runtime.step import MicroBatch


Label = Callable[..., object]  # Runtime.label: (name, flows_in=, flows_out=, **args) -> a trace label or None


def staging_device_numel(cfg: GQAConfig | MLAConfig, micro_batch: int, max_seq_len: int, max_tokens: int,
                         block_size: int) -> int:
    """Device elements of the two staging slots: each one micro-batch's KV of one layer (its sequences' contexts
    rounded up to whole blocks), and its new entries (with FP8, as many again in the work buffers)."""
    return 2 * (layer_kv_numel(cfg, micro_batch, whole_blocks(max_seq_len, block_size))
                + layer_kv_numel(cfg, max_tokens, 1))


def whole_blocks(tokens: int, block_size: int) -> int:
    """`tokens` rounded up to a whole number of blocks."""
    return -(-tokens // block_size) * block_size


@dataclass(slots=True)
class Slot:
    """One staging slot: page-locked host buffers and device buffers, and the events their reuse waits on."""

    host_in: Tensor  # [b * S' * per position] flat, page-locked: the gather's output, the stage copy's source
    device_in: Tensor  # same size, on the device: what the attention launch reads and extends
    device_new: Tensor  # [t * per position] flat, device: the launch's new entries, dense
    host_new: Tensor  # same size, page-locked: the write-back copy's target, the scatter's source
    work: Tensor | None = None  # FP8 only: like device_in, in the run dtype: what the launch reads and extends
    work_new: Tensor | None = None  # FP8 only: like device_new, in the run dtype: the new entries before quantizing
    staged: Event | None = None  # the last stage copy out of host_in (the next gather overwrites it)
    written: Event | None = None  # the last write-back out of device_new (the next stage copy overwrites the slot)
    scattered: Event | None = None  # the last scatter out of host_new (the next write-back overwrites it)


@dataclass(slots=True)
class Staged:
    """A micro-batch's KV on the device, for its attention launch."""

    slot: Slot
    kv: LayerKV  # what the launch reads and extends, views of slot.device_in (FP8: slot.work): [b, S', ...] per
    # tensor (the micro-batch's sequences 0..b-1)
    ready: Event | None  # what the launch waits for: the stage copy (or, with nothing cached to copy, the
    # slot's last write-back)
    nbytes: int  # bytes the stage copy moved
    positions: int  # S': the staged buffer's positions per sequence
    layer: int
    stored: LayerKV | None = None  # FP8 with cached entries: views of slot.device_in, e4m3, to dequantize into kv
    fixes: bool = False  # FP8: this launch fixes the layer's scales (the first of the layer)
    flow: int = 0  # trace flow from the stage copy to the attention launch


@dataclass(slots=True)
class KVStager:
    """The staging slots and the per-layer record of write-backs still on their way home."""

    backend: Backend
    cfg: GQAConfig | MLAConfig
    host_kv: list[LayerKV]  # the host cache: [N, block_size, ...] per tensor and layer
    block_size: int  # tokens per block
    copies: bool  # whether the device is apart from host memory (else a slot's device buffers are its host ones)
    slots: list[Slot]
    fp8: KVFp8 | None  # --kv-dtype fp8: the scales; the buffers hold e4m3 (None: the run dtype)
    free: asyncio.Queue = field(default_factory=asyncio.Queue)
    this_step: list[list[Event]] = field(default_factory=list)  # per layer: this step's cache writes so far
    # (scatters, and host attention's writes of its new entries)
    last_step: list[list[Event]] = field(default_factory=list)  # per layer: the previous step's scatters
    step_of: list[int] = field(default_factory=list)  # per layer: the step its KV work is on

    @classmethod
    def allocate(cls, backend: Backend, cfg: GQAConfig | MLAConfig, host_kv: list[LayerKV], block_size: int,
                 micro_batch: int, max_seq_len: int, max_tokens: int, dtype: torch.dtype, copies: bool,
                 fp8: KVFp8 | None = None) -> KVStager:
        """Two slots, their device buffers counted against the budget (reserved by the caller); `dtype` is the
        run dtype. Buffers start zeroed: positions past a sequence's own are masked, but a stray NaN bit there
        would still survive being multiplied by a zero probability."""
        staged = layer_kv_numel(cfg, micro_batch, whole_blocks(max_seq_len, block_size))
        new = layer_kv_numel(cfg, max_tokens, 1)
        stored = dtype if fp8 is None else FP8

        def device(numel: int, dtype: torch.dtype = stored) -> Tensor:
            return torch.zeros(numel, dtype=dtype, device=backend.device)

        slots = []
        for _ in range(2):
            host_in = backend.host_buffer((staged,), stored, "KV staging").zero_()
            host_new = backend.host_buffer((new,), stored, "KV write-back").zero_()
            slot = Slot(host_in, device(staged) if copies else host_in, device(new) if copies else host_new, host_new)
            if fp8 is not None:
                slot.work, slot.work_new = device(staged, dtype), device(new, dtype)
            slots.append(slot)
        return cls(backend, cfg, host_kv, block_size, copies, slots, fp8)

    def begin(self, layer: int, step: int) -> list[Event]:
        """The first KV work of `step` in `layer` (staging, or host attention) makes it the layer's current step:
        returns the previous step's writes of the layer, which what reads the cache now must wait for."""
        if self.step_of[layer] != step:
            self.step_of[layer] = step
            self.last_step[layer], self.this_step[layer] = self.this_step[layer], []
        return self.last_step[layer]

    def reset(self) -> None:
        """Before a run: every slot free (the backend has finished all earlier work)."""
        self.free = asyncio.Queue()
        for slot in self.slots:
            slot.staged = slot.written = slot.scattered = None
            self.free.put_nowait(slot)
        self.this_step = [[] for _ in self.host_kv]
        self.last_step = [[] for _ in self.host_kv]
        self.step_of = [-1] * len(self.host_kv)

    async def stage(self, layer: int, step: int, mb: MicroBatch, label: Label) -> Staged:
        """Gather the micro-batch's cached rows on the host worker (awaited: the loop goes on meanwhile),
        then copy them onto the device in one copy. `label(name, **args)` names work in a trace."""
        b = self.backend
        self.begin(layer, step)
        slot = await self.free.get()
        S = whole_blocks(mb.attn.max_kv, self.block_size)
        seqs = len(mb.q_lens)
        numel = layer_kv_numel(self.cfg, seqs, S)
        host, device = (layer_kv_over(self.cfg, seqs, S, flat) for flat in (slot.host_in, slot.device_in))
        fp8 = self.fp8
        kv = device if fp8 is None else layer_kv_over(self.cfg, seqs, S, slot.work)
        fixes = fp8 is not None and fp8.claim(layer)  # this micro-batch's launch is the next one of the layer
        if not any(mb.past_lens):  # prompts only: nothing cached to bring. The launch waits for the slot's
            if slot.scattered is not None:  # last write-back (it reads the buffer the launch writes), and our
                await b.wait(slot.scattered)  # write-back for that last scatter (it reads the one ours fills)
            return Staged(slot, kv, slot.written, 0, S, layer, fixes=fixes)
        # The gather waits for what still reads the slot's host buffers: its last stage copy (host_in) and
        # last scatter (host_new, which this micro-batch's write-back overwrites), and for the blocks it reads
        # to be home; awaiting the gather then covers all of it without holding up the micro-batch before.
        for before in (slot.staged, slot.scattered, *self.last_step[layer]):
            if before is not None:
                b.host_gather.wait_event(before)
        where = {"layer": layer, "micro_batch": mb.index, "step": step}
        await b.wait(b.host_gather.submit(lambda: _gather(self.host_kv[layer], host, mb.kv_blocks),
                                          label(f"gather KV[{layer}]", **where)))
        stored = None if fp8 is None else device
        if not self.copies:
            return Staged(slot, kv, None, 0, S, layer, stored, fixes)
        if slot.written is not None:
            b.h2d_kv.wait_event(slot.written)  # the slot's last launch and write-back are done with it
        nbytes = numel * slot.host_in.element_size()
        flow = b.recorder.new_flow() if b.recorder is not None else 0
        src, dst = slot.host_in[:numel], slot.device_in[:numel]
        slot.staged = b.submit_copy(b.h2d_kv, lambda: dst.copy_(src, non_blocking=True), nbytes,
                                    label(f"stage KV[{layer}]", flows_out=(flow,) if flow else (), bytes=nbytes,
                                          **where))
        return Staged(slot, kv, slot.staged, nbytes, S, layer, stored, fixes, flow)

    def dequantize(self, staged: Staged) -> None:
        """Inside the attention launch, before it: with FP8, the staged cached entries into the work buffer it reads."""
        if staged.stored is not None:
            self.fp8.dequantize(staged.layer, staged.stored, staged.kv)

    def new_entries(self, staged: Staged, mb: MicroBatch) -> None:
        """Inside the attention launch, after it: its new entries, [b, S', ...] -> dense [t, ...] in the slot
        (with FP8 into the work buffer first, then quantized into the slot's e4m3 one)."""
        a, slot = mb.attn, staged.slot
        t = len(a.positions)
        new = layer_kv_over(self.cfg, t, 1, slot.device_new if self.fp8 is None else slot.work_new)  # [t, 1, ...]
        flat = a.token_seq * staged.positions + a.positions  # [t] row of each new entry in the [b * S'] view
        for f in fields(new):
            src = getattr(staged.kv, f.name)
            torch.index_select(src.flatten(0, 1), 0, flat, out=getattr(new, f.name).flatten(0, 1))
        if self.fp8 is not None:
            self.fp8.quantize(staged.layer, new, layer_kv_over(self.cfg, t, 1, slot.device_new), staged.fixes)

    def write_back(self, layer: int, step: int, staged: Staged, mb: MicroBatch, done: Event, label: Label) -> Event:
        """After the launch (`done`): its new entries home, one device-to-host copy, then a host scatter.
        Frees the slot; returns the write-back copy's event."""
        b, slot = self.backend, staged.slot
        t = sum(mb.q_lens)
        numel = layer_kv_numel(self.cfg, t, 1)
        nbytes = numel * slot.host_new.element_size()
        where = {"layer": layer, "micro_batch": mb.index, "step": step}
        if self.copies:
            b.d2h.wait_event(done)  # (`stage` saw to it that the slot's last scatter is done with host_new)
            src, dst = slot.device_new[:numel], slot.host_new[:numel]
            slot.written = b.submit_copy(b.d2h, lambda: dst.copy_(src, non_blocking=True), nbytes,
                                         label(f"write back KV[{layer}]", bytes=nbytes, **where))
        else:  # the launch wrote its new entries into host_new itself
            slot.written = done
        b.host_scatter.wait_event(slot.written)
        new = layer_kv_over(self.cfg, t, 1, slot.host_new)
        slot.scattered = b.host_scatter.submit(lambda: _scatter(self.host_kv[layer], new, mb.kv_slots),
                                               label(f"scatter KV[{layer}]", **where))
        self.this_step[layer].append(slot.scattered)
        self.free.put_nowait(slot)
        return slot.written


def _gather(host: LayerKV, staged: LayerKV, blocks: Tensor) -> None:
    """host blocks `blocks` [b, S'/block_size] -> staged [b, S', ...]: one gather per tensor, into its
    destination directly (`dst[...] = src[blocks]` would build the gathered blocks first, a second pass)."""
    for f in fields(host):
        src, dst = getattr(host, f.name), getattr(staged, f.name)  # [N, block_size, ...], [b, S', ...]
        torch.index_select(src, 0, blocks.flatten(), out=dst.view(blocks.numel(), src.shape[1], *src.shape[2:]))


def _scatter(host: LayerKV, new: LayerKV, slots: Tensor) -> None:
    """new entries [t, 1, ...] -> their positions `slots` [t] (block * block_size + offset) of the host cache."""
    for f in fields(host):
        src = getattr(host, f.name)  # [N, block_size, ...]
        _bits(src).view(-1, *src.shape[2:]).index_copy_(0, slots, _bits(getattr(new, f.name))[:, 0])


def _bits(x: Tensor) -> Tensor:
    """x, or its bytes where it is e4m3: torch 2.13's cpu index_copy_ has no float8 kernel (the copy is bitwise)."""
    return x.view(torch.uint8) if x.dtype == FP8 else x
