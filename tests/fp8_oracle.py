"""The FP8 block format's arithmetic written out by hand, the oracle the FP8 tests compare moegen against; and
the FP8 parity checkpoints' shapes."""

from __future__ import annotations

import math

import torch

BLOCK = 128


def dequantize_by_hand(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """data [O, I] (float8) times scale [ceil(O/128), ceil(I/128)], one 128x128 block at a time, in float32."""
    rows, cols = data.shape
    assert tuple(scale.shape) == (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)), (data.shape, scale.shape)
    out = torch.empty(rows, cols, dtype=torch.float32)
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            block = (slice(r * BLOCK, (r + 1) * BLOCK), slice(c * BLOCK, (c + 1) * BLOCK))
            out[block] = data[block].to(torch.float32) * scale[r, c]
    return out


# (family, config overrides making every quantized dimension a multiple of 128). Append a family here.
FP8_PARITY = [
    # q/k/v/o: heads * head_dim; experts: moe_intermediate_size x hidden_size.
    ("qwen3_moe", {"hidden_size": 128, "head_dim": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
                   "moe_intermediate_size": 128, "num_experts": 16}),
    # MLA: q_a [q_lora, H], q_b [N (nope + rope), q_lora], kv_a [kv_lora + rope, H], kv_b [N (nope + v), kv_lora],
    # o [H, N v] with N = 4 heads; the dense first layer, the experts and the one shared expert 128 wide.
    ("deepseek_v3", {"hidden_size": 128, "q_lora_rank": 128, "kv_lora_rank": 128, "qk_rope_head_dim": 128,
                     "qk_nope_head_dim": 32, "v_head_dim": 32, "intermediate_size": 128,
                     "moe_intermediate_size": 128, "n_routed_experts": 16}),
    # GQA with partial rotary: q [N D, H], k/v [G D, H], o [H, N D]; one dense first layer, the experts and the
    # shared expert 128 wide.
    ("glm4_moe", {"hidden_size": 128, "head_dim": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
                  "num_hidden_layers": 3, "first_k_dense_replace": 1, "intermediate_size": 128,
                  "moe_intermediate_size": 128, "n_routed_experts": 16}),
    # GQA with a whole-projection q/k norm and rotary_dim of the head; the experts are intermediate_size wide.
    ("minimax_m2", {"hidden_size": 128, "head_dim": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "rotary_dim": 64, "intermediate_size": 128, "num_local_experts": 16}),
]
IDS = [family for family, _ in FP8_PARITY]
