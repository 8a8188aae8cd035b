"""Decode attention on the host, over the paged host KV cache in place: the new token's entries are written
into its block, each sequence's blocks are read by index, and the model's own attention core runs over them
(`models.attention.gqa_attend`, `models.mla.mla_attend_latent`), so the host computes what the device would.

What crosses for a sequence attended here, per layer (the device projects and applies the output projection):
GQA: q [N, D] and the new k, v [G, D] in, the output [N*D] back; MLA (absorbed): the latent-space query
[N, C] and q_rope [N, R], the new latent [C] and rope key [R] in, the weighted latents [N, C] back.

Letters: b sequences, N heads, G kv heads, D head dim, C latent rank, R rope dim, S longest context,
n blocks per sequence, K blocks in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from moegen.config import GQAConfig, MLAConfig
from moegen.models.attention import gqa_attend
from moegen.models.batch import AttnBatch
from moegen.models.kv_cache import GQALayerKV, LayerKV, MLALayerKV
from moegen.models.mla import mla_attend_latent


@dataclass(slots=True)
class HostDecode:
    """A decode micro-batch's part on the host: where its sequences' KV is, and their new tokens' places."""

    blocks: Tensor  # [b, n] int64: each sequence's blocks, in order (a shorter one's tail names any block: masked)
    slots: Tensor  # [b] int64: its new entry's home, block * block_size + offset
    past_lens: list[int]  # tokens cached before this step's


def write_new(kv: LayerKV, new: LayerKV, slots: Tensor) -> None:
    """The new entries [b, ...] per tensor into their positions of the host cache [K, block_size, ...]."""
    for f in fields(kv):
        cache = getattr(kv, f.name)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, getattr(new, f.name))


def gathered(kv: LayerKV, blocks: Tensor, positions: int, dtype: torch.dtype) -> LayerKV:
    """Each sequence's first `positions` positions, from its blocks of the host cache: [b, positions, ...] per
    tensor, in `dtype` (one gather per tensor)."""
    b, n = blocks.shape
    out = {}
    for f in fields(kv):
        cache = getattr(kv, f.name)  # [K, block_size, ...]
        rows = cache.index_select(0, blocks.flatten())  # [b * n, block_size, ...]
        out[f.name] = rows.view(b, n * cache.shape[1], *cache.shape[2:])[:, :positions].to(dtype)
    return type(kv)(**out)


def decode_batch(past_lens: list[int]) -> AttnBatch:
    """One new token for each sequence, after its cached ones: rows 0..b-1 of the gathered KV."""
    return AttnBatch.build(slots=list(range(len(past_lens))), past_lens=past_lens, q_lens=[1] * len(past_lens))


def gqa_decode(cfg: GQAConfig, kv: GQALayerKV, part: HostDecode, q: Tensor, k: Tensor, v: Tensor,
               window: int | None) -> Tensor:
    """q [b, N, D], the new k, v [b, G, D] -> the attention output [b, N*D] (before the output projection)."""
    write_new(kv, GQALayerKV(k=k.to(kv.k.dtype), v=v.to(kv.v.dtype)), part.slots)
    batch = decode_batch(part.past_lens)
    cached = gathered(kv, part.blocks, batch.max_kv, q.dtype)  # [b, S, G, D] each
    return gqa_attend(cfg, batch, q, cached.k, cached.v, window)


def mla_decode(cfg: MLAConfig, kv: MLALayerKV, part: HostDecode, q_latent: Tensor, q_rope: Tensor, latent: Tensor,
               k_rope: Tensor) -> Tensor:
    """Latent-space queries q_latent [b, N, C], q_rope [b, N, R], the new latent [b, C] and rope key [b, R] ->
    the weighted latents [b, N, C] (kv_b_proj's value half, on the device, makes them values)."""
    write_new(kv, MLALayerKV(latent=latent.to(kv.latent.dtype), k_rope=k_rope.to(kv.k_rope.dtype)), part.slots)
    batch = decode_batch(part.past_lens)
    cached = gathered(kv, part.blocks, batch.max_kv, q_latent.dtype)  # [b, S, C], [b, S, R]
    return mla_attend_latent(cfg, batch, q_latent, q_rope, cached.latent, cached.k_rope)
