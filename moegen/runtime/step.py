"""One step's device-side state, shared by the module tasks that work on it.

Letters: T tokens of the step, B sequences, b sequences of a micro-batch, H hidden, K top-k, E experts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moegen.models.batch import AttnBatch
from moegen.runtime.sampling import SamplingParams
from moegen.runtime.scheduler import StepPlan


@dataclass(slots=True)
class MicroBatch:
    """Consecutive sequences of a step that run one attention launch together."""

    index: int
    first_seq: int  # sequences [first_seq, first_seq + b) of the plan
    tokens: slice  # their tokens in the step's flattened [T]
    attn: AttnBatch  # KV rows (staged 0..b-1, or the sequences' own), past and new lengths
    rows: Tensor  # [b] int64: their rows in the host KV cache
    new_token_rows: Tensor  # [t] int64: host KV row of each new token (for the write-back)


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

    @property
    def index(self) -> int:
        return self.plan.index

    @property
    def num_tokens(self) -> int:
        return self.plan.num_tokens


def micro_batches(plan: StepPlan, size: int, device: torch.device, staged: bool = True) -> list[MicroBatch]:
    """Split the step's sequences, in order, into groups of at most `size`. Staged micro-batches
    address KV rows 0..b-1 of a staging buffer; unstaged ones the sequences' own rows."""
    out, token = [], 0
    for index, first in enumerate(range(0, len(plan.seqs), size)):
        seqs = slice(first, first + size)
        q_lens, past = plan.q_lens[seqs], plan.past_lens[seqs]
        rows = plan.rows[seqs]
        n = sum(q_lens)
        slots = list(range(len(rows))) if staged else rows
        attn = AttnBatch.build(slots=slots, past_lens=past, q_lens=q_lens, device=device)
        new_rows = torch.tensor([r for r, q in zip(rows, q_lens) for _ in range(q)], dtype=torch.int64)
        out.append(MicroBatch(index, first, slice(token, token + n), attn, torch.tensor(rows), new_rows))
        token += n
    return out
