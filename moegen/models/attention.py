"""Grouped-query attention over a batch of sequences with a KV cache (Mixtral, Qwen2/3-MoE, OLMoE).

Letters: T new tokens, B sequences, Qm most new tokens of one sequence, S key positions,
H hidden, N heads, G kv heads, D head dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from moegen.config import GQAConfig
from moegen.models.batch import AttnBatch
from moegen.models.kv_cache import GQALayerKV
from moegen.models.linear import bucket_rows, linear
from moegen.models.rope import Rope, rms_norm
from moegen.models.weights import GQAWeights


def gqa_attention(
    w: GQAWeights, cfg: GQAConfig, rope: Rope, x: Tensor, batch: AttnBatch, kv: GQALayerKV, window: int | None
) -> Tensor:
    """x [T, H] -> [T, H]. Appends the new tokens' k/v to `kv` at their positions, then attends."""
    q, k, v = gqa_project(w, cfg, rope, x, batch)  # [T, N, D], [T, G, D], [T, G, D]
    rows = batch.slots[batch.token_seq]  # [T] KV row of each token
    kv.k[rows, batch.positions] = k.to(kv.k.dtype)
    kv.v[rows, batch.positions] = v.to(kv.v.dtype)
    keys = batch.cached(kv.k).to(q.dtype)  # [B, S, G, D]
    values = batch.cached(kv.v).to(q.dtype)  # [B, S, G, D]
    return linear(gqa_attend(cfg, batch, q, keys, values, window), w.o_proj, w.o_bias)  # [T, H]


def gqa_project(w: GQAWeights, cfg: GQAConfig, rope: Rope, x: Tensor, batch: AttnBatch) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, H] -> the new tokens' rotated queries [T, N, D], rotated keys and values [T, G, D]."""
    q, k, v = _project_qkv(w, cfg, x)  # [T, N, D], [T, G, D], [T, G, D]
    cos, sin = rope.cos_sin(batch.positions)
    return rope.apply(q, cos, sin), rope.apply(k, cos, sin), v


def gqa_attend(cfg: GQAConfig, batch: AttnBatch, q: Tensor, keys: Tensor, values: Tensor, window: int | None) -> Tensor:
    """Queries q [T, N, D] over each sequence's keys and values [B, S, G, D] (its new ones among them) -> the
    attention output [T, N*D], before the output projection."""
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, G, S, D]
    if batch.is_decode:
        # One new token per sequence (T = B): the N/G query heads of a kv head attend as N/G query
        # rows of that head, so K/V are read as they are, never expanded to N heads (1.4x faster
        # on cpu for 256 sequences x 150 positions).
        G = cfg.num_kv_heads
        queries = q.view(len(q), G, cfg.num_heads // G, cfg.head_dim)  # [B, G, N/G, D]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=batch.mask(window), scale=cfg.scale)
        return out.reshape(len(q), -1)  # [B, G, N/G, D] -> [T, N*D]
    queries = batch.pad(q).transpose(1, 2)  # [B, N, Qm, D]
    gqa = cfg.num_heads != cfg.num_kv_heads
    if gqa and q.is_cuda:
        # A masked SDPA with enable_gqa has no fused CUDA kernel: it would fall back to the math one, which
        # builds [B, N, Qm, S] float32 scores. With K/V repeated to N heads the memory-efficient one runs.
        # (The cpu's flash kernel takes enable_gqa as it is.)
        keys = keys.repeat_interleave(cfg.num_heads // cfg.num_kv_heads, dim=1)  # [B, N, S, D]
        values = values.repeat_interleave(cfg.num_heads // cfg.num_kv_heads, dim=1)  # [B, N, S, D]
        gqa = False
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=batch.mask(window), scale=cfg.scale, enable_gqa=gqa
    )  # [B, N, Qm, D]
    return batch.unpad(out.transpose(1, 2)).flatten(1)  # [T, N*D]


def _project_qkv(w: GQAWeights, cfg: GQAConfig, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    T, rows = len(x), bucket_rows(x, w.q_proj)  # [T', H]: padded once for the three projections
    q = linear(rows, w.q_proj, w.q_bias)[:T]  # [T, N*D]
    k = linear(rows, w.k_proj, w.k_bias)[:T]  # [T, G*D]
    v = linear(rows, w.v_proj, w.v_bias)[:T]  # [T, G*D]
    if cfg.qk_norm == "full":  # OLMoE: over the whole projection, before clipping
        q, k = rms_norm(q, w.q_norm, cfg.rms_norm_eps), rms_norm(k, w.k_norm, cfg.rms_norm_eps)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.view(x.shape[0], cfg.num_heads, cfg.head_dim)  # [T, N, D]
    k = k.view(x.shape[0], cfg.num_kv_heads, cfg.head_dim)  # [T, G, D]
    v = v.view(x.shape[0], cfg.num_kv_heads, cfg.head_dim)  # [T, G, D]
    if cfg.qk_norm == "head":  # Qwen3: per head
        q, k = rms_norm(q, w.q_norm, cfg.rms_norm_eps), rms_norm(k, w.k_norm, cfg.rms_norm_eps)
    return q, k, v
