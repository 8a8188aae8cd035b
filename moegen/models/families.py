"""The model-family table: how each supported family names its tensors on disk.

Checkpoint names stay the names. Each family declares one table of templates (`{l}` layer,
`{e}` expert) from the logical fields the model units use to the tensor names in the
checkpoint; the loader reads these tables and nothing else. Two on-disk expert layouts exist:
per-expert 2-D tensors (what real checkpoints and `save_pretrained` write) and fused 3-D
`gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I] (`save_pretrained(save_original_format=False)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

LAYER = "model.layers.{l}."

# Tensors outside the layers.
GLOBAL_NAMES = {
    "embed_tokens": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}

# Per layer, relative to LAYER.
NORM_NAMES = {
    "input_layernorm": "input_layernorm.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
}

GQA_NAMES = {
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
}

MLA_NAMES = {
    "q_proj": "self_attn.q_proj.weight",
    "q_a_proj": "self_attn.q_a_proj.weight",
    "q_a_layernorm": "self_attn.q_a_layernorm.weight",
    "q_b_proj": "self_attn.q_b_proj.weight",
    "kv_a_proj_with_mqa": "self_attn.kv_a_proj_with_mqa.weight",
    "kv_a_layernorm": "self_attn.kv_a_layernorm.weight",
    "kv_b_proj": "self_attn.kv_b_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "o_bias": "self_attn.o_proj.bias",
}

DENSE_NAMES = {
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}

# Fused expert layout: transformers' own module path, the same for every family.
FUSED_PREFIX = "mlp"
FUSED_NAMES = {
    "gate": f"{FUSED_PREFIX}.gate.weight",
    "gate_up_proj": f"{FUSED_PREFIX}.experts.gate_up_proj",
    "down_proj": f"{FUSED_PREFIX}.experts.down_proj",
}


@dataclass(frozen=True, slots=True)
class Family:
    """One family's checkpoint names, and what its transformers code fixes that config.json doesn't say."""

    name: str  # = HF model_type
    architectures: tuple[str, ...]
    attention: Literal["gqa", "mla"]
    num_experts_attr: str  # attribute of the HF config holding the routed expert count
    moe_prefix: str  # MoE block path (per-expert layout), relative to LAYER
    expert_names: tuple[str, str, str]  # gate, up, down of one expert, relative to moe_prefix.experts.{e}
    shared_names: dict[str, str] = field(default_factory=dict)  # gate_proj/up_proj/down_proj (+ gate) of the shared expert
    qk_norm: Literal["none", "head", "full"] = "none"
    qk_norm_flag: str | None = None  # HF config attribute that switches qk_norm on (None: always on)
    o_proj_bias: bool = True  # o_proj has a bias whenever attention_bias does (GLM-4-MoE: never)
    partial_rotary: bool = False  # its rotary embedding rotates head_dim * partial_rotary_factor dims, not all
    scoring: Literal["softmax", "sigmoid"] = "softmax"  # the router's score function
    correction_bias: str | None = None  # the router's score-correction bias, relative to the MoE block (either layout's)
    renormalise: Literal["config", "always", "never"] = "config"  # top-k weights renormalised: as norm_topk_prob says, or fixed
    moe_layers: Literal["all", "first_k_dense_replace", "decoder_sparse_step"] = "all"  # which layers are MoE, by which fields
    skips_layers_past_end: bool = False  # layers >= num_hidden_layers are multi-token-prediction heads transformers ignores

    def moe_names(self, fused: bool) -> dict[str, str]:
        """Router and (per-expert, `{e}`) expert tensor names of one MoE layer, relative to LAYER."""
        if fused:
            names = dict(FUSED_NAMES)
        else:
            gate, up, down = (f"{self.moe_prefix}.experts.{{e}}.{n}.weight" for n in self.expert_names)
            names = {"gate": f"{self.moe_prefix}.gate.weight", "gate_proj": gate, "up_proj": up, "down_proj": down}
        if self.correction_bias:
            names["e_score_correction_bias"] = f"{FUSED_PREFIX if fused else self.moe_prefix}.{self.correction_bias}"
        return names


_QWEN_EXPERT = ("gate_proj", "up_proj", "down_proj")
_DEEPSEEK_SHARED = {
    "gate_proj": "mlp.shared_experts.gate_proj.weight",
    "up_proj": "mlp.shared_experts.up_proj.weight",
    "down_proj": "mlp.shared_experts.down_proj.weight",
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("mixtral", ("MixtralForCausalLM",), "gqa", "num_local_experts", "block_sparse_moe", ("w1", "w3", "w2"),
               renormalise="always"),
        Family(
            "qwen2_moe", ("Qwen2MoeForCausalLM",), "gqa", "num_experts", "mlp", _QWEN_EXPERT,
            shared_names={
                "gate_proj": "mlp.shared_expert.gate_proj.weight",
                "up_proj": "mlp.shared_expert.up_proj.weight",
                "down_proj": "mlp.shared_expert.down_proj.weight",
                "shared_expert_gate": "mlp.shared_expert_gate.weight",
            },
            moe_layers="decoder_sparse_step",
        ),
        Family("qwen3_moe", ("Qwen3MoeForCausalLM",), "gqa", "num_experts", "mlp", _QWEN_EXPERT, qk_norm="head",
               moe_layers="decoder_sparse_step"),
        Family("olmoe", ("OlmoeForCausalLM",), "gqa", "num_experts", "mlp", _QWEN_EXPERT, qk_norm="full"),
        Family("deepseek_v2", ("DeepseekV2ForCausalLM",), "mla", "n_routed_experts", "mlp", _QWEN_EXPERT,
               shared_names=_DEEPSEEK_SHARED, renormalise="never", moe_layers="first_k_dense_replace"),
        Family("deepseek_v3", ("DeepseekV3ForCausalLM",), "mla", "n_routed_experts", "mlp", _QWEN_EXPERT,
               shared_names=_DEEPSEEK_SHARED, scoring="sigmoid", correction_bias="gate.e_score_correction_bias",
               moe_layers="first_k_dense_replace", skips_layers_past_end=True),
        # GLM-4.5/4.6/4.7: DeepSeek-V3's MoE under GQA with partial rotary and o_proj without bias.
        Family("glm4_moe", ("Glm4MoeForCausalLM",), "gqa", "n_routed_experts", "mlp", _QWEN_EXPERT,
               shared_names=_DEEPSEEK_SHARED, qk_norm="head", qk_norm_flag="use_qk_norm", o_proj_bias=False,
               partial_rotary=True, scoring="sigmoid", correction_bias="gate.e_score_correction_bias",
               moe_layers="first_k_dense_replace", skips_layers_past_end=True),
        # MiniMax-M2: Mixtral's names, norms over whole q/k, partial rotary, biased sigmoid routing.
        Family("minimax_m2", ("MiniMaxM2ForCausalLM",), "gqa", "num_local_experts", "block_sparse_moe", ("w1", "w3", "w2"),
               qk_norm="full", partial_rotary=True, scoring="sigmoid", correction_bias="e_score_correction_bias",
               renormalise="always"),
    )
}


def family_for(raw_config: dict, path: Path) -> Family:
    """The family of a parsed config.json, or an error naming what was found and what is supported."""
    model_type = raw_config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    for arch in raw_config.get("architectures") or ():
        for family in FAMILIES.values():
            if arch in family.architectures:
                return family
    from moegen.config import ConfigError

    found = f"model_type {model_type!r}, architectures {raw_config.get('architectures')}"
    raise ConfigError(
        f"{path}: unsupported architecture ({found}); moegen supports model_type "
        + ", ".join(sorted(FAMILIES))
    )
