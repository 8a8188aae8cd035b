"""Which tokens an attention launch holds, and where their sequences' KV lives.

Letters: B sequences, T new tokens (all sequences, flattened), Qm most new tokens of one
sequence, S key positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(slots=True)
class AttnBatch:
    """B sequences, each adding q_lens[b] tokens after past_lens[b] cached ones.

    Tokens are flattened sequence by sequence (T = sum(q_lens)); a sequence's new tokens sit at
    positions past_lens[b] .. past_lens[b] + q_lens[b] - 1, which are also their rows in the KV
    buffers. Host-side ints (max_q, max_kv) are computed once from host lists, never synced.
    """

    slots: Tensor  # [B] int64: each sequence's row in the KV buffers
    past_lens: Tensor  # [B] int64: tokens already in the KV cache
    q_lens: Tensor  # [B] int64: new tokens of each sequence
    positions: Tensor  # [T] int64: position of each new token
    token_seq: Tensor  # [T] int64: which of the B sequences each token belongs to
    token_idx: Tensor  # [T] int64: index of each token among its sequence's new tokens
    max_q: int  # Qm
    max_kv: int  # S = max(past_lens + q_lens)
    first_slot: int | None = None  # slots are first_slot, first_slot + 1, ... (a staged micro-batch): read as a view

    @classmethod
    def build(cls, slots: list[int], past_lens: list[int], q_lens: list[int], device: torch.device | str = "cpu") -> AttnBatch:
        if not (len(slots) == len(past_lens) == len(q_lens)) or min(q_lens, default=1) < 1:
            raise ValueError("slots, past_lens and q_lens must have one entry per sequence, each q_len >= 1")
        q = torch.tensor(q_lens, dtype=torch.int64)
        past = torch.tensor(past_lens, dtype=torch.int64)
        token_seq = torch.repeat_interleave(torch.arange(len(q_lens)), q)  # [T]
        starts = torch.cumsum(q, 0) - q  # [B] first flattened index of each sequence
        token_idx = torch.arange(sum(q_lens)) - starts[token_seq]  # [T]
        return cls(
            slots=torch.tensor(slots, dtype=torch.int64, device=device),
            past_lens=past.to(device),
            q_lens=q.to(device),
            positions=(past[token_seq] + token_idx).to(device),
            token_seq=token_seq.to(device),
            token_idx=token_idx.to(device),
            max_q=max(q_lens),
            max_kv=max(p + n for p, n in zip(past_lens, q_lens)),
            first_slot=slots[0] if slots and slots == list(range(slots[0], slots[0] + len(slots))) else None,
        )

    TENSORS = ("slots", "past_lens", "q_lens", "positions", "token_seq", "token_idx")

    def tensors(self) -> list[Tensor]:
        """Its index tensors, in `TENSORS` order."""
        return [getattr(self, f) for f in self.TENSORS]

    def with_tensors(self, tensors: list[Tensor]) -> AttnBatch:
        """The same batch over other copies of its index tensors (`tensors()` order; host ints unchanged)."""
        return AttnBatch(*tensors, max_q=self.max_q, max_kv=self.max_kv, first_slot=self.first_slot)

    def cached(self, buffer: Tensor) -> Tensor:
        """[slots, S_max, ...] KV buffer -> [B, S, ...]: the batch's rows up to max_kv (a view, no copy,
        when the rows are contiguous)."""
        if self.first_slot is not None:
            return buffer[self.first_slot: self.first_slot + len(self.q_lens), : self.max_kv]
        return buffer[self.slots, : self.max_kv]

    @property
    def is_decode(self) -> bool:
        return self.max_q == 1

    def pad(self, x: Tensor) -> Tensor:
        """[T, ...] -> [B, Qm, ...], zeros where a sequence has fewer new tokens."""
        out = x.new_zeros((len(self.q_lens), self.max_q, *x.shape[1:]))
        out[self.token_seq, self.token_idx] = x
        return out

    def unpad(self, x: Tensor) -> Tensor:
        """[B, Qm, ...] -> [T, ...]."""
        return x[self.token_seq, self.token_idx]

    def mask(self, window: int | None) -> Tensor:
        """[B, 1, Qm, S] bool: key s is visible to new token i of sequence b.

        Causal (s <= its position), within the sliding window if any. Padding rows see key 0
        only, so no row is all-masked (no NaN) and they are dropped by unpad.
        """
        q_pos = self.past_lens[:, None] + torch.arange(self.max_q, device=self.past_lens.device)[None, :]  # [B, Qm]
        k_pos = torch.arange(self.max_kv, device=q_pos.device)  # [S]
        visible = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, Qm, S]
        if window is not None:
            visible &= k_pos[None, None, :] > q_pos[:, :, None] - window
        padding = torch.arange(self.max_q, device=q_pos.device)[None, :] >= self.q_lens[:, None]  # [B, Qm]
        visible = torch.where(padding[:, :, None], k_pos == 0, visible)  # (not visible[padding] = ...: a hidden
        return visible[:, None]  # nonzero, which on a GPU reads its count back to the host)
