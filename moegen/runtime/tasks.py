"""The module tasks: each consumes its queue, launches whole-module work on the compute stream,
and passes the step downstream. Launch order on the one compute stream is the data order, so a
task may launch as soon as its inputs' producers have been *launched*; the host waits only for
the router's expert counts and the sampled ids.

Queues: embed -> attention[0] (per micro-batch) -> router[0] (gathers the step) -> expert[0][e]
and mlp[0] -> combine[0] -> attention[1] ... -> head. Letters: T tokens, H hidden, K top-k.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from moegen.config import MLAConfig
from moegen.models.attention import gqa_attention
from moegen.models.mla import mla_attention
from moegen.models.moe import mlp, route
from moegen.models.reference import embed, lm_head
from moegen.models.rope import rms_norm
from moegen.models.weights import mlp_params
from moegen.runtime.backend import Event
from moegen.runtime.placement import ModuleId
from moegen.runtime.sampling import sample
from moegen.runtime.step import MicroBatch, Step

if TYPE_CHECKING:
    from moegen.runtime.context import Runtime

STOP = object()  # put in every queue when the run ends

# A launch on the cpu backend below both sizes runs on one intra-op thread. On 2 cores the event
# loop's thread shares the cores with the compute thread's OpenMP team, and every parallel op of a
# 2-thread launch waits for a descheduled team member: a DeepSeek-V2-Lite-like expert (4.9 MB of
# weights) over 12-24 tokens took 1.4 ms in a run on 2 threads against 0.7 ms on one (0.35-0.45 ms
# alone either way), while over 256 tokens (6e8 FLOPs) it is 1.8x faster on two. A launch reading
# more weights than SMALL_LAUNCH_BYTES is bound by memory bandwidth, which one thread can't fill
# (a Mixtral-like expert, 25 MB, over 16 tokens: 2.7 ms on two threads, 4.6 ms on one).
# Serve-offline, 128 prompts x 32 tokens, two runs each: DeepSeek-V2-Lite-like 265-289 -> 321-348
# decode tok/s.
SMALL_LAUNCH_FLOPS = 2e8
SMALL_LAUNCH_BYTES = 8 * 2**20
# Expert and MLP launches below LANE_FLOPS are submitted as concurrent: on the cpu backend a layer's
# launches then run side by side on the compute stream's lanes (measurements: cpu_backend.cpu_lanes).
# 6.4e9 FLOPs is a Mixtral-like expert over ~500 tokens: decode launches go to the lanes, an 8k-token
# prefill step's (2k tokens each) don't.
LANE_FLOPS = 6.4e9


def side_by_side(flops: float, alone: bool = False) -> bool:
    """Whether an expert or MLP launch of `flops` is submitted as concurrent (see LANE_FLOPS). A launch
    `alone` in its layer (a dense layer's MLP) is not: on a lane it would run on one core while the
    others wait (DeepSeek-V2-Lite-like decode, the dense MLP over 256 tokens: ~50 ms on a lane)."""
    return not alone and flops < LANE_FLOPS


@contextmanager
def host_threads(x: Tensor, flops: float, weight_bytes: int):
    """Run the enclosed launch on one intra-op thread when it is small and on the cpu (see
    SMALL_LAUNCH_FLOPS); the thread count is restored after. Only the compute stream's thread launches."""
    n = torch.get_num_threads()
    if x.device.type != "cpu" or flops >= SMALL_LAUNCH_FLOPS or weight_bytes >= SMALL_LAUNCH_BYTES or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


async def embed_task(rt: Runtime) -> None:
    """Token ids -> the step's residual stream. The lookup runs where the table is: on the host, the
    rows then crossing the link (the table never occupies the device), or on the device when the
    table is also the lm_head."""
    b = rt.backend
    while (step := await rt.queues.embed.get()) is not STOP:
        ids = torch.tensor(step.plan.token_ids, dtype=torch.int64)
        if rt.placement.embed_on_host:
            nbytes = step.h.numel() * step.h.element_size()
            copied = b.submit_copy(b.h2d_kv, lambda s=step, i=ids: s.h.copy_(embed(rt.core, i), non_blocking=True),
                                   nbytes, rt.label("copy embeddings", step=step.index, bytes=nbytes))
            b.compute.wait_event(copied)
            b.compute.submit(lambda s=step: s.to_device(b.device), rt.label("embed", step=step.index,
                                                                            tokens=step.num_tokens))
        else:
            ids_dev = rt.ids_buffer[: len(ids)]
            copied = b.copy(b.h2d_kv, ids_dev, ids, rt.label("copy token ids", step=step.index))
            b.compute.wait_event(copied)
            b.compute.submit(lambda s=step, i=ids_dev: (s.to_device(b.device), s.h.copy_(embed(rt.core, i))),
                             rt.label("embed", step=step.index, tokens=step.num_tokens))
        for mb in step.micro:
            rt.waiting("attention", sum(mb.q_lens))
            await rt.queues.attn[0].put((step, mb))


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


async def router_task(rt: Runtime, layer: int) -> None:
    """router[layer]: waits for every micro-batch of the step (the accumulation), routes all its
    tokens in one launch, reads the per-expert counts (a host sync), and hands each expert its share."""
    arrived: dict[int, int] = {}
    router = rt.core.routers[layer]
    has_mlp = ModuleId("mlp", layer) in rt.placement.blocks
    streams = router is not None and any(rt.placement.streamed(ModuleId("expert", layer, e))
                                         for e in range(rt.cfg.moe.router.num_experts))
    while (msg := await rt.queues.router[layer].get()) is not STOP:
        step, _ = msg
        arrived[step.index] = arrived.get(step.index, 0) + 1
        if arrived[step.index] < len(step.micro):
            continue
        del arrived[step.index]
        rt.waiting("router", -step.num_tokens)
        done = rt.backend.compute.submit(lambda s=step: _route(rt, layer, s),
                                         rt.label(f"router[{layer}]", layer=layer, step=step.index,
                                                  tokens=step.num_tokens))
        if has_mlp:
            await rt.queues.mlp[layer].put(step)
        if router is None:
            await rt.queues.combine[layer].put(("expect", step, 1))
            continue
        counts = (await rt.read(done, lambda s=step: s.routing[layer].counts)).tolist()  # sync: expert batch sizes
        step.counts[layer].set_result(counts)
        rt.stats.expert_counts.append(counts)
        busy = [e for e, n in enumerate(counts) if n]
        await rt.queues.combine[layer].put(("expect", step, len(busy) + has_mlp))
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        # Resident experts are handed their tokens largest share first: the lanes, each taking the next
        # launch when free, then end the layer together. Streamed ones keep the prefetcher's order.
        order = range(len(counts)) if streams else sorted(range(len(counts)), key=lambda e: -counts[e])
        for e in order:
            if counts[e] or rt.placement.streamed(ModuleId("expert", layer, e)):  # a streamed expert always hears back
                rt.waiting("experts", counts[e])
                await rt.queues.expert[layer][e].put((step, starts[e], counts[e]))


def _route(rt: Runtime, layer: int, step: Step) -> None:
    T = step.num_tokens
    routed = route_launch(step.h[:T], step.x[:T], step.out[:T], rt.core.post_attention_layernorm[layer],
                          rt.cfg.rms_norm_eps, rt.core.routers[layer], rt.cfg.moe.router)
    if routed is not None:
        r = step.routing[layer]
        r.order, r.weights, r.counts = routed


def route_launch(h: Tensor, x: Tensor, out: Tensor, norm: Tensor, eps: float, router, cfg
                 ) -> tuple[Tensor, Tensor, Tensor] | None:
    """The router's launch over a step's T tokens: x = norm(h), out zeroed for the experts' sums, and
    (MoE layers) the token-slot picks sorted by expert [T*K], combine weights [T, K], tokens per expert [E]."""
    gate = router.gate.numel() if router is not None else x.shape[1]
    with host_threads(x, 2 * len(x) * gate, gate * x.element_size()):
        x.copy_(rms_norm(h, norm, eps))
        out.zero_()
        if router is None:
            return None
        r = route(router, cfg, x)
        flat = r.experts.flatten()  # [T*K]
        return flat.argsort(stable=True), r.weights, torch.bincount(flat, minlength=cfg.num_experts)


async def expert_task(rt: Runtime, layer: int, expert: int) -> None:
    """expert[layer][expert]: once per step over all tokens routed to it (in launches of at most
    --expert-micro-batch tokens), while the prefetcher streams the next experts in."""
    module = ModuleId("expert", layer, expert)
    while (msg := await rt.queues.expert[layer][expert].get()) is not STOP:
        step, start, count = msg
        rt.waiting("experts", -count)
        ticket = await rt.placement.acquire(step.index, module)
        if count == 0:  # a streamed expert with no tokens: hand back a slot it may have been given
            if ticket is not None and ticket.flow:
                rt.mark_unused_copy(module, ticket.flow)
            rt.placement.release(ticket, module, None)
            continue
        if ticket.ready is not None:
            rt.backend.compute.wait_event(ticket.ready)
        flops = rt.mlp_flops(ticket.weights, count)
        done = rt.backend.compute.submit(
            lambda s=step, w=ticket.weights, first=start, n=count: _run_expert(rt, layer, s, w, first, n),
            rt.label(f"expert[{layer}][{expert}]", layer=layer, expert=expert, step=step.index, tokens=count,
                     flops=flops, flows_in=(ticket.flow,) if ticket.flow else ()), concurrent=side_by_side(flops))
        rt.placement.release(ticket, module, done)
        await rt.queues.combine[layer].put(("done", step, 0))


def _run_expert(rt: Runtime, layer: int, step: Step, w, start: int, count: int) -> None:
    routing = step.routing[layer]
    expert_launch(w, step.x, step.out, routing.order[start: start + count], routing.weights,
                  rt.cfg.moe.router.top_k, rt.rcfg.expert_micro_batch, step.out_lock)


def expert_launch(w, x: Tensor, out: Tensor, picks: Tensor, weights: Tensor, k: int, cap: int | None,
                  lock: AbstractContextManager = nullcontext()) -> None:
    """One expert over its token-slot picks [t] (token * K + choice), in launches of at most `cap`
    tokens: out[token] += weight * mlp(x[token]), the add under `lock`."""
    cap = cap or len(picks)
    params = mlp_params(w)
    with host_threads(x, 2 * min(cap, len(picks)) * params, params * x.element_size()):
        for first in range(0, len(picks), cap):
            chunk = picks[first: first + cap]  # [t]
            tokens = chunk // k
            y = mlp(w, x[tokens]).mul_(weights[tokens, chunk % k, None].to(x.dtype))  # [t, H]
            with lock:
                out.index_add_(0, tokens, y)


async def mlp_task(rt: Runtime, layer: int) -> None:
    """mlp[layer]: the dense MLP of a dense layer, or the shared expert(s) of an MoE layer."""
    module = ModuleId("mlp", layer)
    while (step := await rt.queues.mlp[layer].get()) is not STOP:
        ticket = await rt.placement.acquire(step.index, module)
        if ticket.ready is not None:
            rt.backend.compute.wait_event(ticket.ready)
        flops = rt.mlp_flops(ticket.weights, step.num_tokens)
        done = rt.backend.compute.submit(
            lambda s=step, t=ticket: mlp_launch(s.x[: s.num_tokens], s.out[: s.num_tokens], t.weights, t.gate, s.out_lock),
            rt.label(f"mlp[{layer}]", layer=layer, step=step.index, tokens=step.num_tokens, flops=flops,
                     flows_in=(ticket.flow,) if ticket.flow else ()),
            concurrent=side_by_side(flops, alone=not rt.cfg.moe_layers[layer]))
        rt.placement.release(ticket, module, done)
        await rt.queues.combine[layer].put(("done", step, 0))


MLP_TEMP_BYTES = 64 * 2**20  # bound on one [tokens, width] intermediate of a dense MLP launch


def mlp_launch(x: Tensor, out: Tensor, w, gate: Tensor | None, lock: AbstractContextManager = nullcontext()) -> None:
    """out += mlp(x) over a step's tokens (the add under `lock`), in chunks whose [t, I] intermediates
    stay under MLP_TEMP_BYTES (a wide dense MLP over an 8k-token prefill step would otherwise hold
    hundreds of MB of temporaries)."""
    T = len(x)
    width = w.gate_proj.shape[0]
    chunk = max(256, MLP_TEMP_BYTES // (width * x.element_size()))
    for first in range(0, T, chunk):
        part = x[first: min(first + chunk, T)]  # [t, H]
        y = mlp(w, part)
        if gate is not None:
            y = torch.sigmoid(F.linear(part, gate)) * y
        with lock:
            out[first: first + len(part)] += y


async def combine_task(rt: Runtime, layer: int) -> None:
    """combine[layer]: once every expert and MLP launch of the step is in, adds their sum to the
    residual stream and releases the micro-batches to attention[layer + 1] (or the head)."""
    expected: dict[int, int] = {}
    arrived: dict[int, int] = {}
    last = layer == rt.cfg.num_layers - 1
    while (msg := await rt.queues.combine[layer].get()) is not STOP:
        kind, step, n = msg
        if kind == "expect":
            expected[step.index] = n
        else:
            arrived[step.index] = arrived.get(step.index, 0) + 1
        if expected.get(step.index) != arrived.get(step.index, 0):
            continue
        expected.pop(step.index), arrived.pop(step.index, None)
        rt.backend.compute.submit(lambda s=step: s.h[: s.num_tokens].add_(s.out[: s.num_tokens]),
                                  rt.label(f"combine[{layer}]", layer=layer, step=step.index, tokens=step.num_tokens))
        if last:
            await rt.queues.head.put(step)
        else:
            for mb in step.micro:
                rt.waiting("attention", sum(mb.q_lens))
                await rt.queues.attn[layer + 1].put((step, mb))


async def head_task(rt: Runtime) -> None:
    """Final norm, lm_head and sampling for each sequence's last token; the host reads the ids."""
    while (step := await rt.queues.head.get()) is not STOP:
        holder = {}
        done = rt.backend.compute.submit(
            lambda s=step, out=holder: out.setdefault("ids", sample(lm_head(rt.core, rt.cfg, s.h[s.last_token]),
                                                                    s.sampling)),
            rt.label("lm_head + sample", step=step.index, sequences=len(step.plan.seqs)))
        ids = await rt.read(done, lambda out=holder: out["ids"])  # sync: the host decides who stops
        step.sampled.set_result(ids.tolist())


async def prefetch_task(rt: Runtime) -> None:
    """Walks each step's modules in execution order and fills device slots ahead of compute.
    An expert whose router has already reported no tokens is skipped, never copied.

    Once a step's walk is done, the next step's walk begins before that step exists (its index is
    known; its routing is not, so nothing is skipped): while the step ends — last experts, lm_head,
    sampling, planning — the link keeps copying the first modules of the next one. A step that then
    never comes leaves its fills unused; the engine cancels this task when the run ends and the
    placement forgets them (`Placement.reset`)."""
    placement = rt.placement
    ahead: set[ModuleId] = set()  # modules already filled for step `index + 1` before it was planned
    while (step := await rt.queues.prefetch.get()) is not STOP:
        done, ahead = ahead, set()
        for module, counts in _walk(rt, step.counts):
            if module in done:
                continue
            if counts is not None and counts.done() and counts.result()[module.expert] == 0:
                placement.skip(step.index, module)
            else:
                await placement.fill(step.index, module)
        for module, _ in _walk(rt, None):
            if not rt.queues.prefetch.empty():  # the next step is planned: walk it for real
                break
            await placement.fill(step.index + 1, module)
            ahead.add(module)


def _walk(rt: Runtime, counts):
    """(module, its layer's expert counts future or None) for every streamed module, in execution order."""
    placement = rt.placement
    for layer in range(rt.cfg.num_layers):
        for module in (ModuleId("attn", layer), ModuleId("mlp", layer)):
            if module in placement.blocks and placement.streamed(module):
                yield module, None
        if rt.core.routers[layer] is None:
            continue
        for e in range(rt.cfg.moe.router.num_experts):
            module = ModuleId("expert", layer, e)
            if placement.streamed(module):
                yield module, None if counts is None else counts[layer]


def all_tasks(rt: Runtime) -> list:
    """Coroutines of every module task, for one TaskGroup."""
    L, E = rt.cfg.num_layers, rt.cfg.moe.router.num_experts
    coros = [embed_task(rt), head_task(rt)]
    for layer in range(L):
        coros += [attention_task(rt, layer), router_task(rt, layer), combine_task(rt, layer)]
        if ModuleId("mlp", layer) in rt.placement.blocks:
            coros.append(mlp_task(rt, layer))
        if rt.core.routers[layer] is not None:
            coros += [expert_task(rt, layer, e) for e in range(E)]
    return coros


def all_queues(queues) -> list[asyncio.Queue]:
    flat = [queues.embed, queues.head, queues.prefetch]
    for group in (queues.attn, queues.router, queues.combine, queues.mlp):
        flat += [q for q in group if q is not None]
    for per_layer in queues.expert:
        flat += per_layer
    return flat
