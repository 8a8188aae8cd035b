"""One step's device-side state, shared by the module tasks that work on it.

Letters: T tokens of the step, B sequences, b sequences of a micro-batch, H hidden, K top-k, E experts.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moegen.models.batch import AttnBatch
from moegen.runtime.ordered_adds import OrderedAdds
from moegen.runtime.sampling import SamplingParams
from moegen.runtime.scheduler import StepPlan


@dataclass(slots=True)
class MicroBatch:
    """Consecutive sequences of a step that run one attention launch together."""

    index: int
    first_seq: int  # sequences [first_seq, first_seq + b) of the plan
    tokens: slice  # their tokens in the step's flattened [T]
    attn: AttnBatch  # KV rows (staged 0..b-1, or the sequences' own rows of a device cache), past and new lengths
    past_lens: list[int]  # cached tokens of each
    q_lens: list[int]  # new tokens of each
    kv_blocks: Tensor | None = None  # [b, S'/block_size] host int64: the host cache's blocks to stage, in order
    # (S' its longest context rounded up to whole blocks; a shorter sequence's tail names block 0, masked)
    kv_slots: Tensor | None = None  # [t] host int64: where each new entry goes home (block * block_size + offset)
    on_host: bool = False  # decode attention on host threads over the host KV (`runtime.host_attention`)


@dataclass(slots=True)
class Routing:
    """Set by the router's launch on the device; read by the expert launches after it."""

    order: Tensor | None = None  # [T*K] token-slot picks sorted by expert
    weights: Tensor | None = None  # [T, K] combine weights
    counts: Tensor | None = None  # [E] tokens per expert


@dataclass(slots=True)
class Step:
    plan: StepPlan
    micro: list[MicroBatch]
    h: Tensor  # [T, H] residual stream
    x: Tensor  # [T, H] the router's / MLP's input (post-attention norm)
    out: Tensor  # [T, H] expert and MLP outputs, summed
    last_token: Tensor  # [B] index of each sequence's last token
    sampling: SamplingParams
    routing: list[Routing]  # per layer
    counts: list[asyncio.Future]  # per layer: host list of tokens per expert, once the router has synced
    sampled: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    adds: OrderedAdds = field(default_factory=OrderedAdds)  # a layer's adds into `out`, in one order whatever
    # order its launches end in (they may run side by side on the cpu compute stream's lanes)

    def inputs(self) -> list[Tensor]:
        """The step's small tensors built on the host (`StepInputs` sends them to the device in one copy)."""
        p = self.sampling
        tensors = [t for mb in self.micro for t in mb.attn.tensors()]
        tensors += [self.last_token, p.temperature, p.top_k, p.top_p, p.seeds, p.counters]
        return tensors + ([] if p.rows is None else [p.rows])

    def use_inputs(self, tensors: list[Tensor]) -> None:
        """Take `tensors` (copies of `inputs()`, in its order) in their place."""
        n = len(AttnBatch.TENSORS)
        for i, mb in enumerate(self.micro):
            mb.attn = mb.attn.with_tensors(tensors[i * n: (i + 1) * n])
        rest = tensors[len(self.micro) * n:]
        p = self.sampling
        self.last_token, p.temperature, p.top_k, p.top_p, p.seeds, p.counters = rest[:6]
        if p.rows is not None:
            p.rows = rest[6]

    @property
    def index(self) -> int:
        return self.plan.index

    @property
    def num_tokens(self) -> int:
        return self.plan.num_tokens


def micro_batches(plan: StepPlan, size: int, block_size: int, staged: bool = True, max_padded: int | None = None,
                  fits: Callable[[int, int, int], bool] | None = None, host_share: float = 0.0) -> list[MicroBatch]:
    """Split the step's sequences, in order, into groups of at most `size`, never mixing decode
    sequences (one new token) with prompts: a prompt in a decode group would pad every query of
    the group to its length. A group of prompts is also cut before its sequences padded to its longest
    would pass `max_padded` tokens (the step's token budget: what the launch's [b, Qm, ...] buffers
    are sized for), so a long prompt beside short ones never pads them all to its length; and any group
    before `fits(sequences, longest new, longest context)` would fail for it (the launch's transient
    memory). Staged micro-batches address KV rows 0..b-1 of a staging buffer, filled from their blocks of
    `block_size` tokens; unstaged ones (a device cache of one block per sequence) their blocks as rows.
    `host_share` of the leading one-token sequences (the running ones: admitted prompts come after them) form
    one micro-batch first, attended on the host (`on_host`; any number of sequences: nothing of theirs is staged)."""
    out, token = [], 0
    limit = math.inf if max_padded is None else max_padded
    lead = next((i for i, q in enumerate(plan.q_lens) if q != 1), len(plan.q_lens))
    on_host = round(host_share * lead) if staged else 0
    groups = ([(0, on_host)] if on_host else []) + [
        (first + on_host, end + on_host)
        for first, end in _groups(plan.q_lens[on_host:], plan.past_lens[on_host:], size, limit, fits)]
    for index, (first, end) in enumerate(groups):
        seqs = slice(first, end)
        q_lens, past, blocks = plan.q_lens[seqs], plan.past_lens[seqs], plan.blocks[seqs]
        n = sum(q_lens)
        slots = list(range(len(q_lens))) if staged else [held[0] for held in blocks]
        attn = AttnBatch.build(slots=slots, past_lens=past, q_lens=q_lens)  # host; StepInputs sends it
        mb = MicroBatch(index, first, slice(token, token + n), attn, past, q_lens, on_host=index == 0 and on_host > 0)
        if staged:
            mb.kv_blocks, mb.kv_slots = _block_index(blocks, attn, block_size)
        out.append(mb)
        token += n
    return out


def _block_index(blocks: list[list[int]], attn: AttnBatch, block_size: int) -> tuple[Tensor, Tensor]:
    """The blocks a staged micro-batch gathers ([b, S'/block_size]) and its new entries' home positions ([t])."""
    width = -(-attn.max_kv // block_size)
    table = torch.tensor([held[:width] + [0] * (width - len(held[:width])) for held in blocks], dtype=torch.int64)
    slots = table[attn.token_seq, attn.positions // block_size] * block_size + attn.positions % block_size  # [t]
    return table, slots


def _groups(q_lens: list[int], past_lens: list[int], size: int, max_padded: float,
            fits: Callable[[int, int, int], bool] | None) -> list[tuple[int, int]]:
    """[first, end) sequence ranges of at most `size`, cut where decode turns to prefill or back, before a
    group of prompts padded to its longest would pass `max_padded` tokens, and before `fits` fails."""
    groups, first = [], 0
    longest = context = 0  # of the group so far
    for i in range(len(q_lens) + 1):
        if i < len(q_lens) and i > first:
            q, c = max(longest, q_lens[i]), max(context, past_lens[i] + q_lens[i])
            n = i + 1 - first
            cut = (n > size or (q_lens[i] == 1) != (q_lens[first] == 1) or (q > 1 and n * q > max_padded)
                   or (fits is not None and not fits(n, q, c)))
        else:
            cut = i == len(q_lens)
        if cut and i > first:
            groups.append((first, i))
            first = i
        if i < len(q_lens):
            longest, context = (q_lens[i], past_lens[i] + q_lens[i]) if first == i else (q, c)
    return groups
