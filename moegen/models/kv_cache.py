"""KV buffers of one layer for a set of sequence slots (the reference model's cache, and the
shape the runtime stages per attention micro-batch).

Letters: B slots, S positions, G kv heads, D head dim, C latent rank, R rope dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moegen.config import GQAConfig, MLAConfig, ModelConfig


@dataclass(slots=True)
class GQALayerKV:
    k: Tensor  # [B, S, G, D], rotated keys
    v: Tensor  # [B, S, G, D]


@dataclass(slots=True)
class MLALayerKV:
    latent: Tensor  # [B, S, C], kv_a_layernorm(compressed kv): keys and values before up-projection
    k_rope: Tensor  # [B, S, R], the one rotated key head shared by all heads


LayerKV = GQALayerKV | MLALayerKV


def allocate_kv(cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"
                ) -> list[LayerKV]:
    """Zeroed KV buffers for every layer: `slots` sequences of up to `max_len` positions."""
    return [layer_kv(cfg.attention, slots, max_len, dtype, device) for _ in range(cfg.num_layers)]


def layer_kv(cfg: GQAConfig | MLAConfig, slots: int, max_len: int, dtype: torch.dtype, device) -> LayerKV:
    return layer_kv_over(cfg, slots, max_len, torch.zeros(layer_kv_numel(cfg, slots, max_len), dtype=dtype,
                                                          device=device))


def layer_kv_numel(cfg: GQAConfig | MLAConfig, slots: int, max_len: int) -> int:
    """Elements of one layer's KV buffers for `slots` sequences of up to `max_len` positions."""
    return slots * max_len * _per_position(cfg)


def layer_kv_over(cfg: GQAConfig | MLAConfig, slots: int, max_len: int, flat: Tensor) -> LayerKV:
    """One layer's KV buffers as views of `flat` (at least `layer_kv_numel` elements; its start used)."""
    def part(offset: int, *shape: int) -> Tensor:
        return flat[offset: offset + torch.Size(shape).numel()].view(shape)

    n = slots * max_len
    if isinstance(cfg, MLAConfig):
        return MLALayerKV(latent=part(0, slots, max_len, cfg.kv_lora_rank),
                          k_rope=part(n * cfg.kv_lora_rank, slots, max_len, cfg.qk_rope_head_dim))
    half = n * cfg.num_kv_heads * cfg.head_dim
    return GQALayerKV(k=part(0, slots, max_len, cfg.num_kv_heads, cfg.head_dim),
                      v=part(half, slots, max_len, cfg.num_kv_heads, cfg.head_dim))


def kv_over(cfg: ModelConfig, slots: int, max_len: int, flat: Tensor) -> list[LayerKV]:
    """Every layer's KV buffers as views of one flat buffer of `slots * max_len * kv_numel_per_token`
    elements, layer after layer (the runtime's host KV cache: one arena, page-locked once)."""
    per_layer = layer_kv_numel(cfg.attention, slots, max_len)
    return [layer_kv_over(cfg.attention, slots, max_len, flat[i * per_layer: (i + 1) * per_layer])
            for i in range(cfg.num_layers)]


def _per_position(cfg: GQAConfig | MLAConfig) -> int:
    """Elements one token's KV occupies in one layer."""
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim if isinstance(cfg, MLAConfig) else 2 * cfg.num_kv_heads * cfg.head_dim


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token's KV occupies across all layers."""
    return _per_position(cfg.attention) * cfg.num_layers * torch.empty(0, dtype=dtype).element_size()
