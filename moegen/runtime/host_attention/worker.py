"""The host attention micro-batch of a layer, end to end across the device and the host worker:

  1. project (compute stream): the input norm and q/k/v projections (MLA: queries folded into latent space);
  2. send (D2H stream): one copy of q and the new k/v (MLA: the new latent and rope key) into page-locked memory;
  3. attend (the host attention worker, `Backend.host_attention`): the new entries are written into their
     blocks of the host KV cache, each sequence's blocks are read in place, the host attends (`attend`);
  4. return (H2D KV stream): one copy of the attention output back;
  5. output (compute stream): the output projection, the residual added.
Steps 1-3 are submitted when the micro-batch arrives; 4 and 5 by `finish`, which the attention task calls after
it has submitted the layer's device micro-batches, so their staging copies and attention run while the host
attends this one (a stream runs in order: submitted earlier, 4 would hold up the staging copies on the KV stream,
5 the device's attention, behind the host's).
Two slots of buffers alternate between layers, each reused only once what read it last is done.

Letters: b sequences, N heads, G kv heads, D head dim, C latent rank, R rope dim.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moegen.config import MLAConfig, ModelConfig
from moegen.models.attention import gqa_project
from moegen.models.linear import linear
from moegen.models.mla import kv_b_halves, mla_project
from moegen.models.rope import rms_norm
from moegen.runtime.backend import Backend, Event
from moegen.runtime.host_attention.attend import HostDecode, gqa_decode, mla_decode

if TYPE_CHECKING:
    from moegen.runtime.context import Runtime
    from moegen.runtime.step import MicroBatch, Step


def sent_shapes(cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Per sequence, what crosses to the host: GQA q [N, D], k, v [G, D]; MLA q_latent [N, C], q_rope [N, R],
    latent [C], k_rope [R]."""
    a = cfg.attention
    if isinstance(a, MLAConfig):
        return [(a.num_heads, a.kv_lora_rank), (a.num_heads, a.qk_rope_head_dim), (a.kv_lora_rank,),
                (a.qk_rope_head_dim,)]
    return [(a.num_heads, a.head_dim), (a.num_kv_heads, a.head_dim), (a.num_kv_heads, a.head_dim)]


def returned_shape(cfg: ModelConfig) -> tuple[int, ...]:
    """Per sequence, what crosses back: GQA the attention output [N*D]; MLA the weighted latents [N, C]."""
    a = cfg.attention
    return (a.num_heads, a.kv_lora_rank) if isinstance(a, MLAConfig) else (a.num_heads * a.head_dim,)


def _numel(shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel()


def per_sequence_numel(cfg: ModelConfig) -> tuple[int, int]:
    """(elements sent, elements returned) per sequence and layer."""
    return sum(map(_numel, sent_shapes(cfg))), _numel(returned_shape(cfg))


def device_bytes(cfg: ModelConfig, sequences: int, element_size: int) -> int:
    """Device bytes of the two slots for up to `sequences` host-attended sequences a step."""
    sent, back = per_sequence_numel(cfg)
    return 2 * sequences * (sent + back) * element_size


def _views(flat: Tensor, b: int, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """`flat` as consecutive [b, *shape] tensors."""
    out, at = [], 0
    for shape in shapes:
        n = b * _numel(shape)
        out.append(flat[at: at + n].view(b, *shape))
        at += n
    return out


@dataclass(slots=True)
class HostSlot:
    device_in: Tensor  # flat, device: what the projection launch writes (q, new k/v) for the send
    host_in: Tensor  # flat, page-locked: the send's target, the host attention's input
    host_out: Tensor  # flat, page-locked: the host attention's output, the return's source
    device_out: Tensor  # flat, device: the return's target, the output projection's input
    sent: Event | None = None  # the last send out of device_in
    attended: Event | None = None  # the last host attention (reads host_in, writes host_out)
    returned: Event | None = None  # the last return out of host_out
    projected: Event | None = None  # the last output projection reading device_out


@dataclass(slots=True)
class HostAttention:
    backend: Backend
    cfg: ModelConfig
    host_kv: list  # the paged host KV cache, per layer [blocks, block_size, ...] per tensor
    threads: int | None  # the worker's intra-op threads
    slots: list[HostSlot]
    free: asyncio.Queue = field(default_factory=asyncio.Queue)

    @classmethod
    def allocate(cls, backend: Backend, cfg: ModelConfig, host_kv: list, sequences: int, dtype: torch.dtype,
                 threads: int | None) -> HostAttention:
        """Two slots for up to `sequences` sequences; their device buffers counted by the caller (`device_bytes`)."""
        sent, back = per_sequence_numel(cfg)
        slots = [HostSlot(torch.zeros(sequences * sent, dtype=dtype, device=backend.device),
                          backend.host_buffer((sequences * sent,), dtype, "host attention input").zero_(),
                          backend.host_buffer((sequences * back,), dtype, "host attention output").zero_(),
                          torch.zeros(sequences * back, dtype=dtype, device=backend.device)) for _ in range(2)]
        return cls(backend, cfg, host_kv, threads, slots)

    def reset(self) -> None:
        """Before a run: every slot free (the backend has finished all earlier work)."""
        self.free = asyncio.Queue()
        for slot in self.slots:
            slot.sent = slot.attended = slot.returned = slot.projected = None
            self.free.put_nowait(slot)

    async def start(self, rt: Runtime, layer: int, step: Step, mb: MicroBatch, ticket) -> Callable[[], Event]:
        """Steps 1-3 for `mb`; returns `finish`, which submits steps 4 and 5 and returns the last one's event. The
        weights are `ticket`'s, unpacked inside the launches that read them."""
        b, cfg, be = len(mb.q_lens), self.cfg, self.backend
        if layer == 0:
            rt.stats.host_attended += b
        slot = await self.free.get()
        sent, back = per_sequence_numel(cfg)
        where = {"layer": layer, "step": step.index, "micro_batch": mb.index, "sequences": b}
        if slot.sent is not None:
            be.compute.wait_event(slot.sent)  # the last send has read device_in
        project = be.compute.submit(
            lambda: self._project(rt, layer, step, mb, ticket.unpack(), slot.device_in[: b * sent]),
            rt.label(f"project for host attention[{layer}]", **where))
        # the send waits for the projections and for the slot's last host attention to have read host_in
        slot.sent = self._copy(rt, be.d2h, (project, slot.attended), slot.device_in[: b * sent],
                               slot.host_in[: b * sent], f"send to host attention[{layer}]", where)
        worker = be.host_attention
        for before in (slot.sent, slot.returned, *rt.stager.begin(layer, step.index)):
            if before is not None:  # the send is in, the last return has read host_out, the blocks are home
                worker.wait_event(before)
        part = HostDecode(mb.kv_blocks, mb.kv_slots, mb.past_lens)
        slot.attended = worker.submit(lambda: self._attend(layer, part, slot, b),
                                      rt.label(f"host attention[{layer}]", **where))
        rt.stager.this_step[layer].append(slot.attended)  # the next step's readers of this layer wait for its writes

        def finish() -> Event:
            # the return waits for the host attention and for the slot's last output projection to have read it
            slot.returned = self._copy(rt, be.h2d_kv, (slot.attended, slot.projected), slot.host_out[: b * back],
                                       slot.device_out[: b * back], f"return host attention[{layer}]", where)
            be.compute.wait_event(slot.returned)
            slot.projected = be.compute.submit(lambda: self._output(rt, layer, step, mb, ticket.unpack(),
                                                                    slot.device_out[: b * back]),
                                               rt.label(f"output of host attention[{layer}]", **where))
            self.free.put_nowait(slot)
            return slot.projected

        return finish

    def _copy(self, rt: Runtime, stream, after: tuple[Event | None, ...], src: Tensor, dst: Tensor, name: str,
              where: dict) -> Event:
        """One copy src -> dst on `stream`, after the events `after`."""
        for event in after:
            if event is not None:
                stream.wait_event(event)
        nbytes = src.numel() * src.element_size()
        return self.backend.submit_copy(stream, lambda: dst.copy_(src, non_blocking=True), nbytes,
                                        rt.label(name, bytes=nbytes, **where))

    def _project(self, rt: Runtime, layer: int, step: Step, mb: MicroBatch, w, flat: Tensor) -> None:
        cfg, a = self.cfg, self.cfg.attention
        x = rms_norm(step.h[mb.tokens], rt.core.input_layernorm[layer], cfg.rms_norm_eps)  # [b, H]
        outs = _views(flat, len(mb.q_lens), sent_shapes(cfg))
        if isinstance(a, MLAConfig):
            q_nope, q_rope, latent, k_rope = mla_project(w, a, rt.rope, x, mb.attn)
            w_k, _ = kv_b_halves(w, a)
            parts = (torch.einsum("tnp,npc->tnc", q_nope, w_k), q_rope, latent, k_rope)  # [b, N, C], ...
        else:
            parts = gqa_project(w, a, rt.rope, x, mb.attn)  # [b, N, D], [b, G, D], [b, G, D]
        for out, part in zip(outs, parts):
            out.copy_(part)

    def _attend(self, layer: int, part: HostDecode, slot: HostSlot, b: int) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # this worker thread's intra-op team
        cfg, a = self.cfg, self.cfg.attention
        ins = _views(slot.host_in, b, sent_shapes(cfg))
        out = slot.host_out[: b * _numel(returned_shape(cfg))].view(b, *returned_shape(cfg))
        kv = self.host_kv[layer]
        if isinstance(a, MLAConfig):
            out.copy_(mla_decode(a, kv, part, *ins))
        else:
            out.copy_(gqa_decode(a, kv, part, *ins, cfg.sliding_windows[layer]))

    def _output(self, rt: Runtime, layer: int, step: Step, mb: MicroBatch, w, flat: Tensor) -> None:
        a, b = self.cfg.attention, len(mb.q_lens)
        att = flat.view(b, *returned_shape(self.cfg))
        if isinstance(a, MLAConfig):
            _, w_v = kv_b_halves(w, a)
            att = torch.einsum("tnc,nvc->tnv", att, w_v).flatten(1)  # [b, N*V]: kv_b_proj's value half
        step.h[mb.tokens] += linear(att, w.o_proj, w.o_bias)  # [b, H]
