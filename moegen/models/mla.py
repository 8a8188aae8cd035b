"""DeepSeek multi-head latent attention over a batch of sequences with a compressed KV cache.

The cache holds, per token, the normalised latent c [C] and one rotated key head k_rope [R].
Two exact forms of the same attention:
- expanded (prefill): up-project every cached latent to per-head keys and values;
- absorbed (decode): fold kv_b_proj's key half into the query and its value half into the
  output, and attend over the latents directly — no per-head keys are ever built.

Letters: T new tokens, B sequences, Qm most new tokens of one sequence, S key positions,
H hidden, N heads, P qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moegen.config import MLA_LATENT_NORM_EPS, MLAConfig
from moegen.models.batch import AttnBatch
from moegen.models.kv_cache import MLALayerKV
from moegen.models.linear import linear
from moegen.models.rope import Rope, rms_norm
from moegen.models.weights import MLAWeights


def mla_attention(
    w: MLAWeights, cfg: MLAConfig, rope: Rope, x: Tensor, batch: AttnBatch, kv: MLALayerKV, absorbed: bool | None = None
) -> Tensor:
    """x [T, H] -> [T, H]. Appends the new tokens' latents to `kv`, then attends.

    `absorbed` picks the form; by default decode batches (one new token per sequence) use the
    absorbed form and everything else the expanded one.
    """
    q_nope, q_rope, latent, k_rope = mla_project(w, cfg, rope, x, batch)
    rows = batch.slots[batch.token_seq]  # [T]
    kv.latent[rows, batch.positions] = latent.to(kv.latent.dtype)
    kv.k_rope[rows, batch.positions] = k_rope.to(kv.k_rope.dtype)

    cached_latent = batch.cached(kv.latent).to(x.dtype)  # [B, S, C]
    cached_rope = batch.cached(kv.k_rope).to(x.dtype)  # [B, S, R]
    use_absorbed = batch.is_decode if absorbed is None else absorbed
    if use_absorbed:
        w_k, w_v = kv_b_halves(w, cfg)
        q_latent = torch.einsum("tnp,npc->tnc", q_nope, w_k)  # [T, N, C]: kv_b_proj's key half folded in
        out_latent = mla_attend_latent(cfg, batch, q_latent, q_rope, cached_latent, cached_rope)  # [T, N, C]
        out = torch.einsum("tnc,nvc->tnv", out_latent, w_v)  # [T, N, V]: its value half
    else:
        out = batch.unpad(_attend_expanded(w, cfg, batch, batch.pad(q_nope), batch.pad(q_rope), cached_latent,
                                           cached_rope))  # [T, N, V]
    return linear(out.flatten(1), w.o_proj, w.o_bias)  # [T, N*V] -> [T, H]


def mla_project(w: MLAWeights, cfg: MLAConfig, rope: Rope, x: Tensor, batch: AttnBatch
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [T, H] -> the new tokens' queries q_nope [T, N, P] and rotated q_rope [T, N, R], and what the cache
    keeps of them: the normalised latent [T, C] and the rotated key head [T, R]."""
    q_nope, q_rope = _queries(w, cfg, x)  # [T, N, P], [T, N, R]
    ckv = linear(x, w.kv_a_proj_with_mqa)  # [T, C+R]
    latent = rms_norm(ckv[:, : cfg.kv_lora_rank], w.kv_a_layernorm, MLA_LATENT_NORM_EPS)  # [T, C]
    k_rope = ckv[:, None, cfg.kv_lora_rank :]  # [T, 1, R]
    cos, sin = rope.cos_sin(batch.positions)
    q_rope, k_rope = rope.apply(q_rope, cos, sin), rope.apply(k_rope, cos, sin)
    return q_nope, q_rope, latent, k_rope[:, 0]


def mla_attend_latent(cfg: MLAConfig, batch: AttnBatch, q_latent: Tensor, q_rope: Tensor, latent: Tensor,
                      k_rope: Tensor) -> Tensor:
    """The absorbed form's attention, weights folded out: queries in latent space q_latent [T, N, C] and q_rope
    [T, N, R] over each sequence's cached latents [B, S, C] and rope keys [B, S, R] -> [T, N, C], the
    probability-weighted latents (kv_b_proj's value half turns them into values)."""
    if batch.is_decode:
        return _attend_latent_decode(cfg, batch, q_latent, q_rope, latent, k_rope)
    q_l, q_r = batch.pad(q_latent), batch.pad(q_rope)  # [B, Qm, N, C], [B, Qm, N, R]
    scores = torch.einsum("bqnc,bsc->bnqs", q_l, latent)  # [B, N, Qm, S]
    scores = scores + torch.einsum("bqnr,bsr->bnqs", q_r, k_rope)
    scores = scores.float() * cfg.scale
    scores = scores.masked_fill(~batch.mask(None), float("-inf"))
    probs = scores.softmax(dim=-1).to(latent.dtype)  # [B, N, Qm, S]
    return batch.unpad(torch.einsum("bnqs,bsc->bqnc", probs, latent))  # [B, Qm, N, C] -> [T, N, C]


def _attend_latent_decode(cfg: MLAConfig, batch: AttnBatch, q_latent: Tensor, q_rope: Tensor, latent: Tensor,
                          k_rope: Tensor) -> Tensor:
    """`mla_attend_latent` for one new token per sequence (T = B, in sequence order, so no padding): batched
    matmuls over [B, N, ·] queries, without the einsums' copies and the pad/unpad scatter and gather (a
    DeepSeek-V2-Lite-like decode half-batch of 128 sequences over ~96 positions, one thread: 3.1 -> 1.9 ms)."""
    scores = torch.bmm(q_latent, latent.transpose(1, 2))  # [B, N, S]
    scores = scores.baddbmm_(q_rope, k_rope.transpose(1, 2)).float().mul_(cfg.scale)
    scores = scores.masked_fill_(~batch.mask(None)[:, 0], float("-inf"))  # mask [B, 1, 1, S] -> [B, 1, S]
    probs = scores.softmax(dim=-1).to(latent.dtype)  # [B, N, S]
    return torch.bmm(probs, latent)  # [B, N, C]


def _queries(w: MLAWeights, cfg: MLAConfig, x: Tensor) -> tuple[Tensor, Tensor]:
    if w.q_proj is not None:
        q = linear(x, w.q_proj)
    else:
        q = linear(rms_norm(linear(x, w.q_a_proj), w.q_a_layernorm, MLA_LATENT_NORM_EPS), w.q_b_proj)
    q = q.view(x.shape[0], cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)  # [T, N, P+R]
    return q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim :]


def kv_b_halves(w: MLAWeights, cfg: MLAConfig) -> tuple[Tensor, Tensor]:
    """kv_b_proj split per head into its key half [N, P, C] and value half [N, V, C]."""
    kv_b = w.kv_b_proj.view(cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
    return kv_b[:, : cfg.qk_nope_head_dim], kv_b[:, cfg.qk_nope_head_dim :]


def _attend_expanded(w, cfg: MLAConfig, batch: AttnBatch, q_nope, q_rope, latent, k_rope) -> Tensor:
    w_k, w_v = kv_b_halves(w, cfg)
    k_nope = torch.einsum("bsc,npc->bnsp", latent, w_k)  # [B, N, S, P]
    values = torch.einsum("bsc,nvc->bnsv", latent, w_v)  # [B, N, S, V]
    k_rot = k_rope[:, None].expand(-1, cfg.num_heads, -1, -1)  # [B, N, S, R]
    keys = torch.cat((k_nope, k_rot), dim=-1)  # [B, N, S, P+R]
    queries = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)  # [B, N, Qm, P+R]
    V, QK = cfg.v_head_dim, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if V < QK:  # values padded with zeros to the q/k width: SDPA's fused kernels want one head width (the
        values = F.pad(values, (0, QK - V))  # [B, N, S, P+R]; cpu's math kernel built [B, N, Qm, S] scores)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=batch.mask(None), scale=cfg.scale)
    return out[..., :V].transpose(1, 2)  # [B, N, Qm, P+R] -> [B, Qm, N, V]
