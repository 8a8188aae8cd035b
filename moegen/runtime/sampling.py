"""Sampling the next token of every sequence in a step, each with its own parameters.

Randomness is counter-based: the uniform number a sequence draws for its n-th token is a hash
of (its seed, n), so its tokens don't depend on B, on its row in the batch, or on what else is
running. Greedy rows (temperature 0) take the argmax.

Letters: B sequences, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A 64-bit constant as torch's int64."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: Tensor) -> Tensor:
    z = x + _GOLDEN  # int64 arithmetic wraps
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def uniform(seeds: Tensor, counters: Tensor) -> Tensor:
    """[B] int64 seeds and draw counters -> [B] float64 uniforms in [0, 1)."""
    z = _splitmix64(_splitmix64(seeds) + counters)
    return _shr(z, 11).double() / float(1 << 53)


@dataclass(slots=True)
class SamplingParams:
    """Per-sequence rows of one step."""

    temperature: Tensor  # [B] float32, 0 = greedy
    top_k: Tensor  # [B] int64, 0 = off
    top_p: Tensor  # [B] float32, 1 = off
    seeds: Tensor  # [B] int64
    counters: Tensor  # [B] int64: index of the token being drawn
    greedy_only: bool  # known on the host: no row samples, so skip the sampling work
    rows: Tensor | None = None  # [R] int64: the rows that sample when only some do (None: all may)
    cuts: bool | None = None  # known on the host: whether the sampling rows cut the vocabulary (top-k or top-p):
    # False none (the draw never sorts), True all (only the sorted draw), None some or unknown (both, per row);
    # each row's draw is the same whichever

    def part(self, first: int, end: int) -> SamplingParams:
        """Rows [first, end) alone (views), each of which may sample (`rows` is not carried over)."""
        return SamplingParams(self.temperature[first:end], self.top_k[first:end], self.top_p[first:end],
                              self.seeds[first:end], self.counters[first:end], self.greedy_only,
                              cuts=self.cuts)


def sample(logits: Tensor, p: SamplingParams) -> Tensor:
    """logits [B, V] float32 -> next ids [B] int64. Only the rows that sample draw, and only where some
    row cuts the vocabulary does the draw sort it (a row's draw depends on its own logits, parameters, seed
    and counter alone)."""
    greedy_ids = logits.argmax(dim=-1)
    if p.greedy_only:
        return greedy_ids
    if p.rows is None:
        sampled = _draw(logits, p.temperature, p.top_k, p.top_p, uniform(p.seeds, p.counters), p.cuts)
        return torch.where(p.temperature > 0, sampled, greedy_ids)
    out = greedy_ids.clone()
    out[p.rows] = draw_rows(logits[p.rows], p, p.rows)
    return out


def draw_rows(logits: Tensor, p: SamplingParams, rows: Tensor) -> Tensor:
    """logits [R, V] of the sampling rows `rows` [R] -> their sampled ids [R]."""
    return _draw(logits, p.temperature[rows], p.top_k[rows], p.top_p[rows], uniform(p.seeds[rows], p.counters[rows]),
                 p.cuts)


def _draw(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, u: Tensor, cuts: bool | None = None
          ) -> Tensor:
    """[R, V] logits, each row's temperature, top-k, top-p and uniform draw u [R] -> sampled ids [R]. A row
    that keeps the whole vocabulary draws by its probabilities in vocabulary order; a row that cuts it (top-k,
    top-p) needs them in descending order, a sort over V per row (20 such rows of 32000 took ~40 ms of a 2-core
    decode step), which runs only where some row cuts (`cuts`, known on the host)."""
    V = logits.shape[-1]
    scaled = logits / temperature.clamp_min(1e-6)[:, None]
    if cuts is not None:
        return _draw_cut(scaled, top_k, top_p, u) if cuts else _pick(scaled.softmax(dim=-1), u)
    keeps_all = ((top_k <= 0) | (top_k >= V)) & (top_p >= 1)  # [R]
    return torch.where(keeps_all, _pick(scaled.softmax(dim=-1), u), _draw_cut(scaled, top_k, top_p, u))


def _pick(probs: Tensor, u: Tensor) -> Tensor:
    """[R, V] probabilities (zeros where cut) and u [R] -> the index where each row's cumulative mass passes u
    (first above it: never a token of no mass, even for u = 0)."""
    cdf = probs.double().cumsum(-1)  # [R, V]
    at = (u.to(probs.device) * cdf[:, -1])[:, None]  # [R, 1]
    return torch.searchsorted(cdf, at, side="right").clamp_max(probs.shape[-1] - 1)[:, 0]


def _draw_cut(scaled: Tensor, top_k: Tensor, top_p: Tensor, u: Tensor) -> Tensor:
    """The draw of rows that cut the vocabulary: over their tokens sorted by probability, top-k then top-p."""
    V = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [R, V]
    ranks = torch.arange(V, device=scaled.device)[None, :]
    keep = ranks < torch.where(top_k > 0, top_k, V)[:, None]
    probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    before = probs.cumsum(-1) - probs  # mass strictly above each token
    keep &= (before < top_p[:, None]) | (ranks == 0)  # top-p: smallest prefix reaching p
    return order.gather(1, _pick(probs.masked_fill(~keep, 0.0), u)[:, None])[:, 0]
