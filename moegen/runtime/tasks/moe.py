"""The MoE half of a layer: router[l] gathers the step and routes it, expert[l][e] runs once over all
its tokens, mlp[l] (a dense MLP or the shared expert), and combine[l] adds their sum to the
residual stream.

Letters: T tokens, H hidden, K top-k, E experts, I expert width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from moegen.models.moe import mlp, route
from moegen.models.rope import rms_norm
from moegen.models.weights import mlp_params
from moegen.runtime.context import STOP
from moegen.runtime.cpu_threads import host_threads, side_by_side
from moegen.runtime.device_memory import MLP_TEMP_BYTES
from moegen.runtime.ordered_adds import NOW, Turn
from moegen.runtime.residency import ModuleId
from moegen.runtime.step import Step
from moegen.runtime.tasks.expert_groups import submit_groups

if TYPE_CHECKING:
    from moegen.runtime.context import Runtime


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
        read = await rt.read(done, lambda s=step: s.routing[layer].counts, rt.counts_read[layer])
        counts = read.tolist()  # sync: expert batch sizes
        step.counts[layer].set_result(counts)
        rt.stats.expert_counts.append(counts)
        await _hand_out(rt, layer, step, counts, has_mlp, streams)


async def _hand_out(rt: Runtime, layer: int, step: Step, counts: list[int], has_mlp: bool, streams: bool) -> None:
    """Launch the layer's expert groups and hand every other expert its tokens (counts: per expert); tell
    combine[layer] how many launches to wait for. Each launch's adds into `out` get a rank (runtime.
    ordered_adds) in the order they are handed out, the MLP's first and streamed experts' last: a launch
    then rarely waits for another's turn (a streamed one runs when its slot is filled)."""
    groups = submit_groups(rt, layer, step, counts, first_rank=int(has_mlp)) if rt.rcfg.expert_groups else []
    grouped = {e for g in groups for e in g.experts}
    # Resident experts are handed their tokens largest share first: the lanes, each taking the next
    # launch when free, then end the layer together. Streamed ones keep the prefetcher's order.
    order = range(len(counts)) if streams else sorted(range(len(counts)), key=lambda e: -counts[e])
    alone = [e for e in order if counts[e] and e not in grouped]
    streamed = {e for e in alone if rt.placement.streamed(ModuleId("expert", layer, e))}
    ranks = {e: r for r, e in enumerate(sorted(alone, key=lambda e: e in streamed), int(has_mlp) + len(groups))}
    await rt.queues.combine[layer].put(("expect", step, len(groups) + len(alone) + has_mlp))
    for _ in groups:
        await rt.queues.combine[layer].put(("done", step, 0))
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    for e in order:
        if e in grouped:
            continue
        if counts[e] or rt.placement.streamed(ModuleId("expert", layer, e)):  # a streamed expert always hears back
            rt.waiting("experts", counts[e])
            await rt.queues.expert[layer][e].put((step, starts[e], counts[e], ranks.get(e, -1)))


def _route(rt: Runtime, layer: int, step: Step) -> None:
    T = step.num_tokens
    routed = route_launch(step.h[:T], step.x[:T], step.out[:T], rt.core.post_attention_layernorm[layer],
                          rt.cfg.rms_norm_eps, rt.core.routers[layer], rt.cfg.moe.router, rt.sizes.router_tokens)
    step.adds.reset()
    if routed is not None:
        r = step.routing[layer]
        r.order, r.weights, r.counts = routed


def route_launch(h: Tensor, x: Tensor, out: Tensor, norm: Tensor, eps: float, router, cfg, chunk: int | None = None
                 ) -> tuple[Tensor, Tensor, Tensor] | None:
    """The router's launch over a step's T tokens: x = norm(h), out zeroed for the experts' sums, and
    (MoE layers) the token-slot picks sorted by expert [T*K], combine weights [T, K], tokens per expert [E];
    norm and routing in chunks of `chunk` tokens (None: all at once), whose float32 buffers the launch's
    transient memory is sized for."""
    T = len(x)
    chunk = chunk or T
    gate = router.gate.numel() if router is not None else x.shape[1]
    with host_threads(x, 2 * T * gate, gate * x.element_size()):
        out.zero_()
        for first in range(0, T, chunk):
            x[first: first + chunk].copy_(rms_norm(h[first: first + chunk], norm, eps))
        if router is None:
            return None
        experts = torch.empty(T, cfg.top_k, dtype=torch.int64, device=x.device)  # [T, K]
        weights = torch.empty(T, cfg.top_k, dtype=torch.float32, device=x.device)  # [T, K]
        for first in range(0, T, chunk):
            r = route(router, cfg, x[first: first + chunk])
            experts[first: first + chunk], weights[first: first + chunk] = r.experts, r.weights
        flat = experts.flatten()  # [T*K]
        # (not bincount: on a GPU it reads the ids' range back to the host to size its output)
        counts = torch.zeros(cfg.num_experts, dtype=torch.int64, device=flat.device).index_add_(
            0, flat, torch.ones_like(flat))  # [E]
        return flat.argsort(stable=True), weights, counts


async def expert_task(rt: Runtime, layer: int, expert: int) -> None:
    """expert[layer][expert]: once per step over all tokens routed to it (in launches of at most
    --expert-micro-batch tokens), while the prefetcher streams the next experts in."""
    module = ModuleId("expert", layer, expert)
    while (msg := await rt.queues.expert[layer][expert].get()) is not STOP:
        step, start, count, rank = msg
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
            lambda s=step, t=ticket, first=start, n=count, r=rank: _run_expert(rt, layer, s, t.unpack(), first, n, r),
            rt.label(f"expert[{layer}][{expert}]", layer=layer, expert=expert, step=step.index, tokens=count,
                     flops=flops, flows_in=(ticket.flow,) if ticket.flow else ()), concurrent=side_by_side(flops))
        rt.placement.release(ticket, module, done)
        await rt.queues.combine[layer].put(("done", step, 0))


def _run_expert(rt: Runtime, layer: int, step: Step, w, start: int, count: int, rank: int) -> None:
    routing = step.routing[layer]
    expert_launch(w, step.x, step.out, routing.order[start: start + count], routing.weights,
                  rt.cfg.moe.router.top_k, rt.sizes.expert_tokens, step.adds.turn(rank))


def expert_launch(w, x: Tensor, out: Tensor, picks: Tensor, weights: Tensor, k: int, cap: int | None,
                  turn: Turn = NOW) -> None:
    """One expert over its token-slot picks [t] (token * K + choice), in launches of at most `cap`
    tokens: out[token] += weight * mlp(x[token]), each add in `turn`."""
    cap = cap or len(picks)
    params = mlp_params(w)
    with host_threads(x, 2 * min(cap, len(picks)) * params, params * x.element_size()):
        for first in range(0, len(picks), cap):
            chunk = picks[first: first + cap]  # [t]
            tokens = chunk // k
            y = mlp(w, x[tokens]).mul_(weights[tokens, chunk % k, None].to(x.dtype))  # [t, H]
            turn.add(lambda tokens=tokens, y=y: out.index_add_(0, tokens, y))
    turn.end()


async def mlp_task(rt: Runtime, layer: int) -> None:
    """mlp[layer]: the dense MLP of a dense layer, or the shared expert(s) of an MoE layer."""
    module = ModuleId("mlp", layer)
    while (step := await rt.queues.mlp[layer].get()) is not STOP:
        ticket = await rt.placement.acquire(step.index, module)
        if ticket.ready is not None:
            rt.backend.compute.wait_event(ticket.ready)
        flops = rt.mlp_flops(ticket.weights, step.num_tokens)
        done = rt.backend.compute.submit(
            lambda s=step, t=ticket: mlp_launch(s.x[: s.num_tokens], s.out[: s.num_tokens], t.unpack(), t.gate, s.adds.turn(0),
                                                rt.sizes.mlp_chunk(t.weights.gate_proj.shape[0])),
            rt.label(f"mlp[{layer}]", layer=layer, step=step.index, tokens=step.num_tokens, flops=flops,
                     flows_in=(ticket.flow,) if ticket.flow else ()),
            concurrent=side_by_side(flops, alone=not rt.cfg.moe_layers[layer]))
        rt.placement.release(ticket, module, done)
        await rt.queues.combine[layer].put(("done", step, 0))




def mlp_launch(x: Tensor, out: Tensor, w, gate: Tensor | None, turn: Turn = NOW, chunk: int | None = None) -> None:
    """out += mlp(x) over a step's tokens (each add in `turn`), in chunks of `chunk` tokens (default: [t, I]
    intermediates under MLP_TEMP_BYTES; a wide dense MLP over an 8k-token prefill step would otherwise hold
    hundreds of MB of temporaries)."""
    T = len(x)
    chunk = chunk or max(256, MLP_TEMP_BYTES // (w.gate_proj.shape[0] * x.element_size()))
    for first in range(0, T, chunk):
        part = x[first: min(first + chunk, T)]  # [t, H]
        y = mlp(w, part)
        if gate is not None:
            y = torch.sigmoid(F.linear(part, gate)) * y
        turn.add(lambda rows=out[first: first + len(part)], y=y: rows.add_(y))
    turn.end()


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
