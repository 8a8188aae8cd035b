"""The step's two ends and what runs ahead of it: embed (token ids -> the residual stream), head
(final norm, lm_head, sampling; the host reads the ids) and the prefetcher (fills device slots in
execution order ahead of compute).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moegen.models.reference import embed, lm_head
from moegen.runtime.backend import Event
from moegen.runtime.context import STOP
from moegen.runtime.residency import ModuleId
from moegen.runtime.sampling import SamplingParams, draw_rows, sample

if TYPE_CHECKING:
    from moegen.runtime.context import Runtime


async def embed_task(rt: Runtime) -> None:
    """Token ids -> the step's residual stream, after the step's inputs are sent (`StepInputs`: one copy).
    The lookup runs where the table is: on the host (the table never occupies the device), gathered by a
    host worker into page-locked rows that cross in one copy; or on the device when the table is also
    the lm_head."""
    b = rt.backend
    while (step := await rt.queues.embed.get()) is not STOP:
        ids = torch.tensor(step.plan.token_ids, dtype=torch.int64)
        sent, ids_dev = await rt.step_inputs.send(step, ids, rt.label("copy step inputs", step=step.index))
        b.compute.wait_event(sent)
        if rt.placement.embed_on_host:
            b.compute.wait_event(await _copy_embeddings(rt, step, ids))
        else:
            b.compute.submit(lambda s=step, i=ids_dev: s.h.copy_(embed(rt.core, i)),
                             rt.label("embed", step=step.index, tokens=step.num_tokens))
        for mb in step.micro:
            rt.waiting("attention", sum(mb.q_lens))
            await rt.queues.attn[0].put((step, mb))


async def _copy_embeddings(rt: Runtime, step, ids) -> Event:
    """The step's rows of the host table: gathered into page-locked rows on a host worker (awaited), then
    one copy into the residual stream."""
    b, T = rt.backend, len(ids)
    rows = rt.embed_rows[:T]
    if rt.embed_copied is not None:
        b.host_gather.wait_event(rt.embed_copied)  # the last step's copy out of the rows is done
    await b.wait(b.host_gather.submit(lambda: torch.index_select(rt.core.embed_tokens, 0, ids, out=rows),
                                      rt.label("gather embeddings", step=step.index, tokens=T)))
    nbytes = rows.numel() * rows.element_size()
    rt.embed_copied = b.submit_copy(b.h2d_kv, lambda s=step: s.h.copy_(rows, non_blocking=True), nbytes,
                                    rt.label("copy embeddings", step=step.index, bytes=nbytes))
    return rt.embed_copied


async def head_task(rt: Runtime) -> None:
    """Final norm, lm_head and sampling for each sequence's last token; the host reads the ids."""
    while (step := await rt.queues.head.get()) is not STOP:
        holder = {}
        done = rt.backend.compute.submit(
            lambda s=step, out=holder: out.setdefault("ids", head_launch(rt.core, rt.cfg, s.h[s.last_token],
                                                                         s.sampling, rt.sizes.head_rows)),
            rt.label("lm_head + sample", step=step.index, sequences=len(step.plan.seqs)))
        ids = await rt.read(done, lambda out=holder: out["ids"], rt.ids_read[: len(step.plan.seqs)])  # sync: the
        step.sampled.set_result(ids.tolist())  # host decides who stops


def head_launch(core, cfg, h: Tensor, p: SamplingParams, rows: tuple[int, int]) -> Tensor:
    """h [B, H] (each sequence's last token) -> its next ids [B]: the lm_head and sampling over at most
    rows[0] sequences at a time (rows[1] where they sample), so the [rows, V] float32 logits and the
    sampling's sorts stay within what the device budget holds for them (`LaunchSizes.head_rows`). When
    only some rows sample, the pass over all is greedy and theirs is run again to draw."""
    greedy, drawn = rows
    every = not p.greedy_only and p.rows is None  # every row may sample: one pass, drawing
    chunk = drawn if every else greedy
    ids = torch.empty(len(h), dtype=torch.int64, device=h.device)  # [B]
    for first in range(0, len(h), chunk):
        logits = lm_head(core, cfg, h[first: first + chunk])  # [c, V]
        ids[first: first + chunk] = sample(logits, p.part(first, first + chunk)) if every else logits.argmax(-1)
    if p.rows is not None and not p.greedy_only:
        for first in range(0, len(p.rows), drawn):
            r = p.rows[first: first + drawn]  # [c] rows that sample
            ids[r] = draw_rows(lm_head(core, cfg, h[r]), p, r)
    return ids


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
