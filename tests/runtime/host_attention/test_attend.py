"""Host decode attention over the paged cache, against attention written out by hand per sequence (float64,
a dense list of its keys), with the sequences' blocks scattered through the cache in shuffled order."""

from __future__ import annotations

import math

import pytest
import torch

from moegen.config import GQAConfig, MLAConfig
from moegen.models.kv_cache import GQALayerKV, MLALayerKV
from moegen.runtime.host_attention.attend import HostDecode, gqa_decode, mla_decode

BLOCK = 4
PAST = [5, 0, 9, 8]  # cached tokens of each sequence before its new one (the longest context, 10, ends mid-block)


def layout(past: list[int], blocks_in_cache: int, seed: int) -> tuple[HostDecode, list[list[int]]]:
    """Each sequence's blocks (enough for its past + new token), drawn from a shuffled cache."""
    gen = torch.Generator().manual_seed(seed)
    free = torch.randperm(blocks_in_cache, generator=gen).tolist()
    held = [[free.pop() for _ in range(-(-(p + 1) // BLOCK))] for p in past]
    n = max(map(len, held))
    table = torch.tensor([h + [0] * (n - len(h)) for h in held])
    slots = torch.tensor([h[p // BLOCK] * BLOCK + p % BLOCK for h, p in zip(held, past)])
    return HostDecode(table, slots, list(past)), held


def positions(cache: torch.Tensor, held: list[int], count: int) -> torch.Tensor:
    """A sequence's first `count` positions, read from its blocks one by one."""
    return torch.stack([cache[held[t // BLOCK], t % BLOCK] for t in range(count)])


def softmax_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q [D] over keys [S, D], values [S, V] -> [V], float64."""
    scores = [float(q @ k) * scale for k in keys]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return sum(w / total * v for w, v in zip(weights, values))


@pytest.mark.parametrize("window", [None, 6])
def test_gqa_host_decode_is_attention_over_each_sequences_own_blocks(window):
    cfg = GQAConfig(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=False, o_bias=False,
                    qk_norm="none", clip_qkv=None, rms_norm_eps=1e-6, rope=None)
    part, held = layout(PAST, 24, seed=0)
    g = torch.Generator().manual_seed(1)
    kv = GQALayerKV(k=torch.randn(24, BLOCK, 2, 8, generator=g), v=torch.randn(24, BLOCK, 2, 8, generator=g))
    b = len(PAST)
    q, k, v = torch.randn(b, 4, 8, generator=g), torch.randn(b, 2, 8, generator=g), torch.randn(b, 2, 8, generator=g)
    out = gqa_decode(cfg, kv, part, q, k, v, window).view(b, 4, 8)
    for i, p in enumerate(PAST):
        assert torch.equal(kv.k[held[i][p // BLOCK], p % BLOCK], k[i])  # the new entry went home, in place
        keys, values = positions(kv.k, held[i], p + 1).double(), positions(kv.v, held[i], p + 1).double()
        first = 0 if window is None else max(0, p + 1 - window)
        for head in range(4):
            group = head // 2  # 4 query heads share 2 kv heads
            want = softmax_attend(q[i, head].double(), keys[first:, group], values[first:, group], cfg.scale)
            assert torch.allclose(out[i, head].double(), want, atol=1e-5), (i, head)


def test_mla_host_decode_attends_over_latents_and_rope_keys():
    cfg = MLAConfig(hidden_size=32, num_heads=3, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                    qk_rope_head_dim=4, v_head_dim=8, o_bias=False, scale=0.2, rope=None)
    part, held = layout(PAST, 20, seed=2)
    g = torch.Generator().manual_seed(3)
    kv = MLALayerKV(latent=torch.randn(20, BLOCK, 16, generator=g), k_rope=torch.randn(20, BLOCK, 4, generator=g))
    b = len(PAST)
    q_latent, q_rope = torch.randn(b, 3, 16, generator=g), torch.randn(b, 3, 4, generator=g)
    latent, k_rope = torch.randn(b, 16, generator=g), torch.randn(b, 4, generator=g)
    out = mla_decode(cfg, kv, part, q_latent, q_rope, latent, k_rope)  # [b, N, C]
    for i, p in enumerate(PAST):
        lat = positions(kv.latent, held[i], p + 1).double()
        rope = positions(kv.k_rope, held[i], p + 1).double()
        assert torch.equal(lat[p].float(), latent[i])
        keys = torch.cat((lat, rope), dim=1)  # the absorbed form: a key is the latent and the rope key side by side
        for head in range(3):
            query = torch.cat((q_latent[i, head], q_rope[i, head])).double()
            want = softmax_attend(query, keys, lat, cfg.scale)
            assert torch.allclose(out[i, head].double(), want, atol=1e-5), (i, head)
