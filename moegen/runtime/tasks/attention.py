"""attention[l]: one launch per micro-batch of sequences, its KV staged in from host memory and the
new entries written back.

Letters: T tokens, H hidden, b sequences of a micro-batch, S' longest cached context.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moegen.config import MLAConfig
from moegen.models.attention import gqa_attention
from moegen.models.mla import mla_attention
from moegen.models.rope import rms_norm
from moegen.runtime.backend import Event
from moegen.runtime.context import STOP
from moegen.runtime.placement import ModuleId
from moegen.runtime.step import MicroBatch, Step

if TYPE_CHECKING:
    from moegen.runtime.context import Runtime


async def attention_task(rt: Runtime, layer: int) -> None:
    """attention[layer]: one launch per micro-batch, its KV staged in from the host and the new
    entries written back; the weights ticket is held from the step's first micro-batch to its last."""
    module, ticket = ModuleId("attn", layer), None
    b = rt.backend
    while (msg := await rt.queues.attn[layer].get()) is not STOP:
        step, mb = msg
        rt.waiting("attention", -sum(mb.q_lens))
        if mb.index == 0:
            ticket = await rt.placement.acquire(step.index, module)
        if ticket.ready is not None:
            b.compute.wait_event(ticket.ready)
        weight_flow = (ticket.flow,) if ticket.flow and mb.index == 0 else ()
        if not rt.stage_kv:  # the KV is where the compute reads it (--batching model, or an unbudgeted cpu)
            done = b.compute.submit(lambda s=step, m=mb, w=ticket.weights: _attend(rt, layer, s, m, w, rt.kv[layer]),
                                    rt.attention_label(layer, step, mb, weight_flow))
        else:
            done = await _attend_staged(rt, layer, step, mb, ticket, weight_flow)
        if mb.index == len(step.micro) - 1:
            rt.placement.release(ticket, module, done)
        rt.waiting("router", sum(mb.q_lens))
        await rt.queues.router[layer].put((step, mb))


async def _attend_staged(rt: Runtime, layer: int, step: Step, mb: MicroBatch, ticket, flows: tuple[int, ...]) -> Event:
    """Stage the micro-batch's KV in, attend, and write its new entries back to the host."""
    b = rt.backend
    slot, last_use = await rt.staging.get()
    staged = rt.staging_kv[slot]
    if last_use is not None:
        b.h2d_kv.wait_event(last_use)
    if rt.last_writeback[layer] is not None:  # the previous step's new KV of this layer is home
        b.h2d_kv.wait_event(rt.last_writeback[layer])
    kv_in, kv_out = _kv_bytes(staged, sum(mb.past_lens)), _kv_bytes(staged, sum(mb.q_lens))
    kv_flow = rt.recorder.new_flow() if rt.recorder is not None else 0
    ready = b.submit_copy(b.h2d_kv, lambda h=rt.kv[layer], s=staged, m=mb: _stage(h, s, m), kv_in,
                          rt.label(f"stage KV[{layer}]", layer=layer, micro_batch=mb.index, step=step.index,
                                   bytes=kv_in, flows_out=(kv_flow,) if kv_flow else ()))
    b.compute.wait_event(ready)
    done = b.compute.submit(lambda s=step, m=mb, w=ticket.weights, kv=staged: _attend(rt, layer, s, m, w, kv),
                            rt.attention_label(layer, step, mb, flows + ((kv_flow,) if kv_flow else ())))
    b.d2h.wait_event(done)
    home = b.submit_copy(b.d2h, lambda h=rt.kv[layer], s=staged, m=mb: _write_back(h, s, m), kv_out,
                         rt.label(f"write back KV[{layer}]", layer=layer, micro_batch=mb.index, step=step.index,
                                  bytes=kv_out))
    rt.last_writeback[layer] = home
    rt.staging.put_nowait((slot, home))
    return done


def _stage(host, staged, mb: MicroBatch) -> None:
    """Each sequence's cached rows, host -> staging row i. Within host memory (the cpu backend) one
    gather per tensor, up to the longest cache (positions past a sequence's own are masked); to a GPU
    one asynchronous copy per sequence and tensor from pinned memory."""
    pairs = [(getattr(host, f.name), getattr(staged, f.name)) for f in fields(host)]  # (src, dst)
    if pairs[0][0].device == pairs[0][1].device:
        longest, rows = max(mb.past_lens), torch.tensor(mb.rows)
        for src, dst in pairs:
            if longest:
                dst[: len(mb.rows), :longest] = src[rows, :longest]  # [b, S', ...]
        return
    for src, dst in pairs:
        for i, (row, past) in enumerate(zip(mb.rows, mb.past_lens)):
            if past:
                dst[i, :past].copy_(src[row, :past], non_blocking=True)


def _write_back(host, staged, mb: MicroBatch) -> None:
    """Each sequence's new entries, staging row i -> its host row: one scatter per tensor within host
    memory, else one copy per sequence and tensor."""
    pairs = [(getattr(staged, f.name), getattr(host, f.name)) for f in fields(host)]  # (src, dst)
    if pairs[0][0].device == pairs[0][1].device:
        a = mb.attn  # token t of the micro-batch: staging row a.token_seq[t], position a.positions[t]
        token_rows = torch.tensor(mb.rows)[a.token_seq]  # [T] host row of each token
        for src, dst in pairs:
            dst[token_rows, a.positions] = src[a.token_seq, a.positions]  # [T, ...]
        return
    for src, dst in pairs:
        for i, (row, past, q) in enumerate(zip(mb.rows, mb.past_lens, mb.q_lens)):
            dst[row, past: past + q].copy_(src[i, past: past + q], non_blocking=True)


def _kv_bytes(kv, positions: int) -> int:
    return sum(getattr(kv, f.name)[0, 0].numel() * getattr(kv, f.name).element_size() for f in fields(kv)) * positions


def _attend(rt: Runtime, layer: int, step: Step, mb: MicroBatch, w, staged) -> None:
    attention_launch(rt.cfg, layer, rt.core.input_layernorm[layer], rt.rope, w, step.h[mb.tokens], mb.attn, staged)


def attention_launch(cfg, layer: int, norm: Tensor, rope, w, h: Tensor, batch, kv) -> None:
    """One attention launch over a micro-batch's tokens h [t, H] (updated in place, residual added)."""
    x = rms_norm(h, norm, cfg.rms_norm_eps)
    if isinstance(cfg.attention, MLAConfig):
        h += mla_attention(w, cfg.attention, rope, x, batch, kv)
    else:
        h += gqa_attention(w, cfg.attention, rope, x, batch, kv, cfg.sliding_windows[layer])
