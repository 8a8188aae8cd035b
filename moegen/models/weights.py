"""The tensors each model unit is handed. Field names are the checkpoint's names.

Letters: H hidden, V vocab, N heads, G kv heads, D head dim, E experts, I expert width,
C latent rank (kv_lora_rank), R rope dim, Q q_lora_rank. The runtime owns where these live;
the units only read them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor


@dataclass(slots=True)
class MLPWeights:
    """One SwiGLU MLP: a routed expert, the shared expert(s), or a dense layer's MLP."""

    gate_proj: Tensor  # [I, H]
    up_proj: Tensor  # [I, H]
    down_proj: Tensor  # [H, I]


@dataclass(slots=True)
class GQAWeights:
    q_proj: Tensor  # [N*D, H]
    k_proj: Tensor  # [G*D, H]
    v_proj: Tensor  # [G*D, H]
    o_proj: Tensor  # [H, N*D]
    q_bias: Tensor | None = None  # [N*D]
    k_bias: Tensor | None = None  # [G*D]
    v_bias: Tensor | None = None  # [G*D]
    o_bias: Tensor | None = None  # [H]
    q_norm: Tensor | None = None  # [D] per head (Qwen3) or [N*D] whole projection (OLMoE)
    k_norm: Tensor | None = None  # [D] or [G*D]


@dataclass(slots=True)
class MLAWeights:
    kv_a_proj_with_mqa: Tensor  # [C+R, H]
    kv_a_layernorm: Tensor  # [C]
    kv_b_proj: Tensor  # [N*(Dnope+Dv), C]
    o_proj: Tensor  # [H, N*Dv]
    q_proj: Tensor | None = None  # [N*(Dnope+R), H] without q-LoRA
    q_a_proj: Tensor | None = None  # [Q, H] with q-LoRA
    q_a_layernorm: Tensor | None = None  # [Q]
    q_b_proj: Tensor | None = None  # [N*(Dnope+R), Q]
    o_bias: Tensor | None = None  # [H]


@dataclass(slots=True)
class RouterWeights:
    gate: Tensor  # [E, H]
    e_score_correction_bias: Tensor | None = None  # [E], DeepSeek-V3: steers selection only


@dataclass(slots=True)
class MoEWeights:
    router: RouterWeights
    experts: list[MLPWeights]  # E routed experts
    shared: MLPWeights | None = None  # shared expert(s), always applied
    shared_expert_gate: Tensor | None = None  # [1, H], Qwen2-MoE: sigmoid gate of the shared expert


@dataclass(slots=True)
class LayerWeights:
    input_layernorm: Tensor  # [H]
    attn: GQAWeights | MLAWeights
    post_attention_layernorm: Tensor  # [H]
    moe: MoEWeights | None  # MoE layers
    mlp: MLPWeights | None  # dense layers (DeepSeek first_k_dense_replace, Qwen mlp_only_layers)


@dataclass(slots=True)
class ModelWeights:
    embed_tokens: Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: Tensor  # [H]
    lm_head: Tensor  # [V, H]; the embedding itself when tied


def mlp_params(w: MLPWeights) -> int:
    """Weights of one SwiGLU MLP: its launch over t tokens is 2 * t * this many FLOPs."""
    return w.gate_proj.numel() + w.up_proj.numel() + w.down_proj.numel()


def tensors_of(unit) -> list[Tensor]:
    """The non-empty tensor fields of one weights dataclass (for byte counts and placement)."""
    return [t for t in (getattr(unit, f.name) for f in fields(unit)) if isinstance(t, Tensor)]


# The fields of each streamable unit that are only ever the W of x Wᵀ (models.linear.linear), which a
# backend may store reordered for its matmul. MLA's kv_b_proj is not: it is split per head.
LINEAR_FIELDS: dict[type, tuple[str, ...]] = {
    MLPWeights: ("gate_proj", "up_proj", "down_proj"),
    GQAWeights: ("q_proj", "k_proj", "v_proj", "o_proj"),
    MLAWeights: ("kv_a_proj_with_mqa", "o_proj", "q_proj", "q_a_proj", "q_b_proj"),
}
