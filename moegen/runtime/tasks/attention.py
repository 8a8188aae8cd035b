"""attention[l]: one launch per micro-batch of sequences, its KV staged in from host memory and the
new entries written back.

Letters: T tokens, H hidden.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from moegen.config import MLAConfig
from moegen.models.attention import gqa_attention
from moegen.models.batch import AttnBatch
from moegen.models.mla import mla_attention
from moegen.models.rope import rms_norm
from moegen.runtime.backend import Event
from moegen.runtime.context import STOP
from moegen.runtime.residency import ModuleId
from moegen.runtime.step import MicroBatch, Step

if TYPE_CHECKING:
    from moegen.runtime.context import Runtime

LANE_SEQUENCES = 16  # a decode micro-batch is split over the cpu lanes from this many sequences per lane
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


async def attention_task(rt: Runtime, layer: int) -> None:
    """attention[layer]: one launch per micro-batch, its KV staged in from the host and the new
    entries written back; the weights ticket is held from the step's first micro-batch to its last."""
    module, ticket, on_host = ModuleId("attn", layer), None, []
    b = rt.backend
    while (msg := await rt.queues.attn[layer].get()) is not STOP:
        step, mb = msg
        rt.waiting("attention", -sum(mb.q_lens))
        if mb.index == 0:
            ticket = await rt.placement.acquire(step.index, module)
        if ticket.ready is not None:
            b.compute.wait_event(ticket.ready)
        weight_flow = (ticket.flow,) if ticket.flow and mb.index == 0 else ()
        if mb.on_host:  # its output projection waits until the device's micro-batches are submitted
            on_host.append((mb, await rt.host_attention.start(rt, layer, step, mb, ticket)))
            done = None
        elif rt.kv_on_device:  # --batching model: the KV is where the compute reads it
            done = b.compute.submit(lambda s=step, m=mb, t=ticket: _attend(rt, layer, s, m, t.unpack(), rt.kv[layer]),
                                    rt.attention_label(layer, step, mb, weight_flow))
        else:
            done = await _attend_staged(rt, layer, step, mb, ticket, weight_flow)
        await _send_on(rt, layer, step, mb, ticket, module, done, on_host)


async def _send_on(rt: Runtime, layer: int, step: Step, mb: MicroBatch, ticket, module, done: Event | None,
                   on_host: list) -> None:
    """Hand `mb` to the router (a host-attended one, `done` None, once it is finished); after the layer's last
    micro-batch, finish the host-attended ones (their output projections) and release the weights once the last
    launch reading them is done."""
    finished = [] if done is None else [(mb, done)]
    if mb.index == len(step.micro) - 1:
        finished += [(held, finish()) for held, finish in on_host]
        on_host.clear()
        rt.placement.release(ticket, module, finished[-1][1])
    for m, _ in finished:
        rt.waiting("router", sum(m.q_lens))
        await rt.queues.router[layer].put((step, m))


async def _attend_staged(rt: Runtime, layer: int, step: Step, mb: MicroBatch, ticket, flows: tuple[int, ...]) -> Event:
    """Stage the micro-batch's KV in, attend, and write its new entries back to the host (`kv.staging`)."""
    b, stager = rt.backend, rt.stager
    staged = await stager.stage(layer, step.index, mb, rt.label)
    if staged.ready is not None:
        b.compute.wait_event(staged.ready)

    flows += (staged.flow,) if staged.flow else ()
    parts = lane_parts(mb, b.compute.lanes)  # lanes: the cpu compute stream's (1 elsewhere)
    if len(parts) == 1:
        def launch(s=step, m=mb, t=ticket) -> None:
            stager.dequantize(staged)
            _attend(rt, layer, s, m, t.unpack(), staged.kv)
            stager.new_entries(staged, m)

        done = b.compute.submit(launch, rt.attention_label(layer, step, mb, flows))
    else:  # side by side on the cpu lanes, each over its share of the sequences; the new entries once both are done
        if staged.stored is not None:
            b.compute.submit(lambda: stager.dequantize(staged))
        for i, (seqs, tokens, part) in enumerate(parts):
            b.compute.submit(lambda s=step, t=ticket, r=tokens, a=part: attention_launch(
                rt.cfg, layer, rt.core.input_layernorm[layer], rt.rope, t.unpack(), s.h[r], a, staged.kv),
                rt.attention_label(layer, step, mb, flows if i == 0 else (), seqs), concurrent=True)
        done = b.compute.submit(lambda m=mb: stager.new_entries(staged, m))
    stager.write_back(layer, step.index, staged, mb, done, rt.label)
    return done


def lane_parts(mb: MicroBatch, lanes: int) -> list[tuple[slice, slice, AttnBatch]]:
    """A staged micro-batch's attention as `lanes` launches over consecutive shares of its sequences (each
    share's sequences, its tokens of the step, its batch over the staged rows) where it is a decode one of at
    least LANE_SEQUENCES sequences per lane; else the one launch over all of it.

    Why: on 2 cores a decode attention launch is a chain of small ops that a 2-thread OpenMP team splits
    poorly, and its members stall whenever the event loop's or the KV gather's thread runs. DeepSeek-V2-Lite-
    like serve-offline, 256 prompts x 64 new tokens, one traced run each: attention per decode step 59 -> 43 ms
    and the decode step 291 -> 267 ms as two halves on the lanes, one thread each."""
    n = len(mb.q_lens)
    if lanes < 2 or mb.attn.max_q != 1 or n < lanes * LANE_SEQUENCES or mb.attn.first_slot != 0:
        return [(slice(0, n), mb.tokens, mb.attn)]
    cuts = [n * i // lanes for i in range(lanes + 1)]
    first = mb.tokens.start
    device = mb.attn.slots.device
    return [(slice(a, b), slice(first + a, first + b),
             AttnBatch.build(list(range(a, b)), mb.past_lens[a:b], mb.q_lens[a:b], device))
            for a, b in zip(cuts, cuts[1:])]


def _attend(rt: Runtime, layer: int, step: Step, mb: MicroBatch, w, staged) -> None:
    attention_launch(rt.cfg, layer, rt.core.input_layernorm[layer], rt.rope, w, step.h[mb.tokens], mb.attn, staged)


def attention_launch(cfg, layer: int, norm: Tensor, rope, w, h: Tensor, batch, kv) -> None:
    """One attention launch over a micro-batch's tokens h [t, H] (updated in place, residual added). On a
    GPU, SDPA may use its fused kernels only: a silent fallback to the math kernel would build [b, N, Qm,
    S] float32 scores that the device budget does not hold; it fails instead, naming the reason."""
    with sdpa_kernel(FUSED) if h.is_cuda else nullcontext():
        x = rms_norm(h, norm, cfg.rms_norm_eps)
        if isinstance(cfg.attention, MLAConfig):
            h += mla_attention(w, cfg.attention, rope, x, batch, kv)
        else:
            h += gqa_attention(w, cfg.attention, rope, x, batch, kv, cfg.sliding_windows[layer])
