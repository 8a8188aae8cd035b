"""Grouped expert launches: the resident experts of a layer that have tokens run in a few launches,
each over several experts' tokens, instead of one launch (a task hop, a submission, a trace slice, a
gather and a locked add) per expert.

A layer with many small experts (DeepSeek-V2-Lite-like: 64 routed top-6, ~24 tokens each in a 256-
sequence decode step) spent more time in those per-launch costs than in its matmuls. A group gathers
its tokens once, runs each member's SwiGLU over its contiguous share, scales and adds them back once.
Streamed experts are not grouped: each still runs alone when its slot is filled, in the prefetcher's
order. On the cpu backend a layer's groups are submitted as concurrent, so the compute stream's lanes
take them side by side; elsewhere (and with --no-expert-groups) nothing changes but the launch count.

Why each member keeps its own matmuls (`python -m tools.grouped_kernels`, 2 cpu cores, float32, one
DeepSeek-V2-Lite-like layer over 256 tokens top-6): a loop of oneDNN-reordered linears 44 ms, against
torch._grouped_mm over the stacked weights 88 ms and a padded bmm 61 ms; a Mixtral-like layer (8 experts
top-2) 44 against 69 and 83. On a GPU the choice is not measured yet.

Letters: T tokens, H hidden, K top-k, E experts, P picks of the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from moegen.models.moe import mlp
from moegen.models.weights import mlp_params
from moegen.runtime.cpu_threads import host_threads, side_by_side
from moegen.runtime.ordered_adds import NOW, Turn
from moegen.runtime.residency import ModuleId

if TYPE_CHECKING:
    from moegen.runtime.context import Runtime
    from moegen.runtime.step import Step


@dataclass(frozen=True, slots=True)
class Group:
    """Consecutive experts of a layer whose token-slot picks are one contiguous run of the routing order."""

    experts: tuple[int, ...]  # the members with tokens, in expert order
    counts: tuple[int, ...]  # each member's tokens
    start: int  # first pick in the routing order

    @property
    def tokens(self) -> int:
        return sum(self.counts)


def plan_groups(counts: list[int], grouped: list[bool], pieces: int, limit: int | None = None) -> list[Group]:
    """The groups of one layer's step: runs of consecutive experts that may be grouped (`grouped[e]`: resident)
    cut into about `pieces` runs of about equal tokens and none of more than `limit` tokens (an expert that may
    not be grouped, or has more than `limit` tokens, ends a run and runs alone), largest first. Experts with no
    tokens belong to no group."""
    if limit is not None:
        grouped = [ok and n <= limit for n, ok in zip(counts, grouped)]
    total = sum(n for n, ok in zip(counts, grouped) if ok)
    if not total:
        return []
    target = -(-total // max(1, pieces))
    groups: list[Group] = []
    members: list[int] = []
    start = first = held = 0  # held: the open group's tokens

    def close() -> None:
        nonlocal held
        if members:
            groups.append(Group(tuple(members), tuple(counts[e] for e in members), first))
            members.clear()
            held = 0

    for e, n in enumerate(counts):
        if n and not grouped[e]:
            close()
        elif n:
            if members and limit is not None and held + n > limit:
                close()
            if not members:
                first = start
            members.append(e)
            held += n
            if held >= target:
                close()
        start += n
    close()
    return sorted(groups, key=lambda g: -g.tokens)


def group_flops(units: list, group: Group) -> int:
    """2 FLOPs per multiply-add over each member's three projections."""
    return sum(2 * n * mlp_params(w) for w, n in zip(units, group.counts))


def group_concurrent(units: list, group: Group) -> bool:
    """Whether a group runs on a cpu lane: while each of its members would (cpu_threads.side_by_side)."""
    return all(side_by_side(2 * n * mlp_params(w)) for w, n in zip(units, group.counts))


def group_launch(units: list, group: Group, x: Tensor, out: Tensor, order: Tensor, weights: Tensor, k: int,
                 cap: int | None, turn: Turn = NOW) -> None:
    """The members of `group` (their weights `units`) over their picks of the routing `order` [T*K], in
    launches of at most `cap` tokens per member: out[token] += weight * mlp_e(x[token]), one add in `turn`."""
    picks = order[group.start: group.start + group.tokens]  # [P] token * K + choice, sorted by expert
    tokens = picks // k
    largest = max(group.counts)
    params = mlp_params(units[0])
    with host_threads(x, 2 * min(cap or largest, largest) * params, params * x.element_size()):
        rows = x[tokens]  # [P, H]
        first = 0
        for w, n in zip(units, group.counts):
            step = cap or n
            for a in range(first, first + n, step):
                b = min(a + step, first + n)
                rows[a:b] = mlp(w, rows[a:b])
            first += n
        rows.mul_(weights.view(-1)[picks, None].to(x.dtype))  # weights [T, K]: pick token * K + choice
        turn.add(lambda: out.index_add_(0, tokens, rows))
    turn.end()


def submit_groups(rt: Runtime, layer: int, step: Step, counts: list[int], first_rank: int) -> list[Group]:
    """Launch the groups of `layer`'s resident experts over `step` (counts: tokens per expert), their adds
    ranked from `first_rank` on; returns them (their experts get no launch of their own). On the cpu with
    lanes: 2 groups per lane, which the lanes take as they come free beside the MLP's launch; elsewhere one
    group."""
    resident = rt.placement.resident
    ids = [ModuleId("expert", layer, e) for e in range(len(counts))]
    lanes = rt.backend.compute.lanes
    groups = plan_groups(counts, [m in resident for m in ids], 2 * lanes if lanes > 1 else 1, rt.sizes.group_tokens)
    routing, k = step.routing[layer], rt.cfg.moe.router.top_k
    for rank, g in enumerate(groups, first_rank):
        units = [resident[ids[e]].weights for e in g.experts]
        flops = group_flops(units, g)
        rt.backend.compute.submit(
            lambda g=g, units=units, r=rank: group_launch(units, g, step.x, step.out, routing.order, routing.weights,
                                                          k, rt.sizes.expert_tokens, step.adds.turn(r)),
            rt.label(f"expert[{layer}] group", layer=layer, step=step.index, tokens=g.tokens, flops=flops,
                     experts=" ".join(f"{e}:{n}" for e, n in zip(g.experts, g.counts))),
            concurrent=group_concurrent(units, g))
    return groups
