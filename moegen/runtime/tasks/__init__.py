"""The module tasks: each consumes its queue, launches whole-module work on the compute stream,
and passes the step downstream. Launch order on the one compute stream is the data order, so a
task may launch as soon as its inputs' producers have been *launched*; the host waits only for
the router's expert counts and the sampled ids.

Queues: embed -> attention[0] (per micro-batch) -> router[0] (gathers the step) -> expert[0][e]
and mlp[0] -> combine[0] -> attention[1] ... -> head. One file per part of a layer: attention;
the MoE half (router, experts, MLP, combine); the step's ends and the prefetcher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moegen.runtime.residency import ModuleId
from moegen.runtime.tasks.attention import attention_launch, attention_task
from moegen.runtime.tasks.moe import (combine_task, expert_launch, expert_task, mlp_launch, mlp_task, route_launch,
                                      router_task)
from moegen.runtime.tasks.step_ends import embed_task, head_launch, head_task, prefetch_task

if TYPE_CHECKING:
    from moegen.runtime.context import Runtime

__all__ = ["all_tasks", "attention_launch", "expert_launch", "head_launch", "mlp_launch", "prefetch_task",
           "route_launch"]


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
