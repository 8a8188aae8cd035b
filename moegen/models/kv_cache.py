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


def allocate_kv(cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                pin: bool = False) -> list[LayerKV]:
    """Zeroed KV buffers for every layer: `slots` sequences of up to `max_len` positions
    (`pin`: page-locked host memory, so copies to and from a GPU are asynchronous)."""
    return [layer_kv(cfg.attention, slots, max_len, dtype, device, pin) for _ in range(cfg.num_layers)]


def layer_kv(cfg: GQAConfig | MLAConfig, slots: int, max_len: int, dtype: torch.dtype, device, pin: bool = False) -> LayerKV:
    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)

    if isinstance(cfg, MLAConfig):
        return MLALayerKV(latent=zeros(slots, max_len, cfg.kv_lora_rank), k_rope=zeros(slots, max_len, cfg.qk_rope_head_dim))
    return GQALayerKV(k=zeros(slots, max_len, cfg.num_kv_heads, cfg.head_dim),
                      v=zeros(slots, max_len, cfg.num_kv_heads, cfg.head_dim))


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token's KV occupies across all layers."""
    a = cfg.attention
    per_layer = a.kv_lora_rank + a.qk_rope_head_dim if isinstance(a, MLAConfig) else 2 * a.num_kv_heads * a.head_dim
    return per_layer * cfg.num_layers * torch.empty(0, dtype=dtype).element_size()
