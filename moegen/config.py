"""The model's shape: small frozen dataclasses, one per component, so each unit receives only
its own sub-config. `moegen.models.hf_config` fills them from a Hugging Face `config.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moegen.models.families import FAMILIES, Family

# The eps of DeepSeek's q_a/kv_a layernorms: transformers builds them with the RMSNorm default,
# not `rms_norm_eps`.
MLA_LATENT_NORM_EPS = 1e-6


class ConfigError(ValueError):
    """A checkpoint's config.json can't be served: names the file, the field and the fix."""


@dataclass(frozen=True, slots=True)
class RopeConfig:
    dim: int  # R: rotated dims per head (even); a head's dims past R pass through (partial rotary)
    theta: float  # base wavelength
    kind: Literal["default", "yarn"]
    interleaved: bool  # DeepSeek pairs (x0,x1),(x2,x3)… instead of rotate-half
    factor: float = 1.0  # yarn: context extension factor
    original_max_positions: int = 0  # yarn: pretraining context length
    beta_fast: float = 32.0  # yarn: ramp bounds (rotations)
    beta_slow: float = 1.0
    attention_factor: float = 1.0  # multiplies cos and sin (so q·k by its square)
    truncate: bool = True  # yarn: round the correction range to whole dims

    def __post_init__(self):
        if self.dim % 2:
            raise ConfigError(f"rotary dim must be even, got {self.dim}")


@dataclass(frozen=True, slots=True)
class GQAConfig:
    """Grouped-query attention (Mixtral, Qwen2/3-MoE, OLMoE, GLM-4-MoE, MiniMax-M2)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2-MoE)
    o_bias: bool  # o_proj carries a bias
    qk_norm: Literal["none", "head", "full"]  # RMSNorm of q and k: per head (Qwen3, GLM) or whole projection (OLMoE, MiniMax-M2)
    clip_qkv: float | None  # OLMoE: clamp q, k, v to ±clip
    rms_norm_eps: float
    rope: RopeConfig

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads "
                              f"{self.num_kv_heads}; set num_key_value_heads to a divisor of it")

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5


@dataclass(frozen=True, slots=True)
class MLAConfig:
    """DeepSeek multi-head latent attention."""

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None  # None: q_proj straight from hidden (V2-Lite)
    kv_lora_rank: int  # C: width of the compressed latent that is cached
    qk_nope_head_dim: int
    qk_rope_head_dim: int  # R: rotary part of q/k, one shared key head
    v_head_dim: int
    o_bias: bool
    scale: float  # softmax scale, yarn mscale² applied
    rope: RopeConfig


@dataclass(frozen=True, slots=True)
class RouterConfig:
    num_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid"]
    topk_method: Literal["greedy", "group_limited_greedy", "noaux_tc"]
    norm_topk_prob: bool  # renormalise the top-k weights to sum to 1
    routed_scaling_factor: float
    n_group: int  # expert groups for group-limited routing (1 = none)
    topk_group: int  # groups a token may pick from
    correction_bias: bool  # e_score_correction_bias added to sigmoid scores for selection only (DeepSeek-V3, GLM, MiniMax-M2)

    def __post_init__(self):
        if not 0 < self.top_k <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok {self.top_k} must be in 1..{self.num_experts} (the number of "
                              "experts); set it within that range")
        if self.num_experts % self.n_group:
            raise ConfigError(f"n_routed_experts {self.num_experts} is not a multiple of n_group {self.n_group}; set "
                              "n_group to a divisor of it")


@dataclass(frozen=True, slots=True)
class MoEConfig:
    router: RouterConfig
    expert_intermediate: int  # I: width of one routed expert
    shared_intermediate: int  # width of the shared expert(s) MLP; 0 = none
    shared_gate: bool  # Qwen2-MoE: sigmoid(x·w) scales the shared expert


@dataclass(frozen=True, slots=True)
class ModelConfig:
    family: str  # key of FAMILIES (= HF model_type)
    vocab_size: int
    hidden_size: int
    num_layers: int
    rms_norm_eps: float
    attention: GQAConfig | MLAConfig
    moe: MoEConfig
    dense_intermediate: int  # width of the dense MLP of non-MoE layers
    moe_layers: tuple[bool, ...]  # per layer: MoE block (True) or dense MLP (False)
    sliding_windows: tuple[int | None, ...]  # per layer: attend to the last N positions, or all
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # generation stops on any of these
    extra_layers: int  # layers stored past num_hidden_layers that transformers ignores (V3 MTP)

    def __post_init__(self):
        if len(self.moe_layers) != self.num_layers or len(self.sliding_windows) != self.num_layers:
            raise ConfigError("per-layer tables must have num_hidden_layers entries")

    @property
    def family_spec(self) -> Family:
        return FAMILIES[self.family]
