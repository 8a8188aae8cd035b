"""config.json of each family at each size, shaped like the real checkpoints.

Every size keeps the real model's ratios (experts, top-k, shared experts, dense first layers,
GQA/MLA dimensions) and its config.json spelling (`rope_scaling` with `type: yarn`,
`n_routed_experts`, `num_nextn_predict_layers`, …); only widths and depths shrink.
`tiny` (< 2M parameters) uses a 512-id byte-level BPE; `small` (10-40M) and `bench`
(150-300M) the real Mixtral 32k SentencePiece vocabulary.
"""

from __future__ import annotations

from typing import Any

SIZES = ("tiny", "small", "bench")
FAMILY_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "minimax_m2")
TOKENIZER_KIND = {"tiny": "bpe", "small": "mixtral", "bench": "mixtral"}
TOKENIZER_VOCAB = {"bpe": 512, "mixtral": 32000}
PARAM_RANGE = {"tiny": (0, 2_000_000), "small": (10_000_000, 40_000_000), "bench": (150_000_000, 300_000_000)}

# The real models these imitate: Mixtral-8x7B, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, OLMoE-1B-7B,
# DeepSeek-V2-Lite, DeepSeek-V3, GLM-4.5, MiniMax-M2. Per size: (hidden, layers, heads, kv_heads,
# expert width, dense/shared width).
_DIMS: dict[str, dict[str, tuple[int, int, int, int, int, int]]] = {
    "mixtral": {"tiny": (64, 2, 4, 1, 224, 0), "small": (256, 3, 8, 2, 896, 0), "bench": (768, 4, 8, 2, 2688, 0)},
    "qwen2_moe": {"tiny": (64, 2, 4, 4, 44, 176), "small": (256, 2, 8, 8, 176, 704), "bench": (768, 3, 12, 12, 528, 2112)},
    "qwen3_moe": {"tiny": (64, 2, 8, 1, 24, 192), "small": (256, 2, 8, 1, 96, 768), "bench": (768, 2, 16, 2, 288, 2304)},
    "olmoe": {"tiny": (64, 2, 4, 4, 32, 0), "small": (256, 3, 8, 8, 128, 0), "bench": (768, 3, 12, 12, 384, 0)},
    "deepseek_v2": {"tiny": (64, 3, 4, 4, 44, 342), "small": (256, 3, 8, 8, 176, 1368), "bench": (768, 3, 8, 8, 528, 4104)},
    "deepseek_v3": {"tiny": (48, 3, 4, 4, 12, 124), "small": (192, 3, 8, 8, 56, 496), "bench": (512, 3, 8, 8, 146, 1316)},
    # GLM-4.5: 96 heads over 8 kv heads of 128 dims (N*D = 2.4 H), experts 0.3 H wide, dense layers 2.4 H;
    # 3 dense layers first, then MoE.
    "glm4_moe": {"tiny": (40, 5, 12, 1, 12, 96), "small": (160, 5, 12, 1, 48, 384), "bench": (640, 5, 12, 1, 192, 1536)},
    # MiniMax-M2: 48 heads over 8 kv heads of 128 dims (N*D = 2 H), experts 0.5 H wide, every layer MoE.
    "minimax_m2": {"tiny": (48, 2, 6, 1, 24, 0), "small": (144, 2, 6, 1, 72, 0), "bench": (384, 3, 6, 1, 192, 0)},
}
# Head dims where they are not hidden / heads: N*D keeps the real model's ratio to H.
_HEAD_DIM = {"glm4_moe": {"tiny": 8, "small": 32, "bench": 128}, "minimax_m2": {"tiny": 16, "small": 48, "bench": 128}}
# MLA per size: (q_lora_rank or None, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim).
_MLA: dict[str, dict[str, tuple[int | None, int, int, int, int]]] = {
    "deepseek_v2": {"tiny": (None, 16, 16, 8, 16), "small": (None, 64, 32, 16, 32), "bench": (None, 192, 64, 32, 64)},
    "deepseek_v3": {"tiny": (16, 8, 8, 4, 8), "small": (48, 16, 24, 12, 24), "bench": (112, 48, 64, 32, 64)},
}

CHAT_TEMPLATES = {
    "mixtral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "olmoe": (
        "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "deepseek": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
        "{{ 'Assistant: ' + message['content'] + eos_token }}{% else %}{{ message['content'] + '\n\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
    "glm": (
        "[gMASK]<sop>{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "minimax": (
        "{% for message in messages %}{{ ']~b]' + ('ai' if message['role'] == 'assistant' else message['role']) + '\n' "
        "+ message['content'] + '[e~[\n' }}{% endfor %}{% if add_generation_prompt %}{{ ']~b]ai\n' }}{% endif %}"
    ),
}
FAMILY_TEMPLATE = {"mixtral": "mixtral", "qwen2_moe": "chatml", "qwen3_moe": "chatml", "olmoe": "olmoe",
                   "deepseek_v2": "deepseek", "deepseek_v3": "deepseek", "glm4_moe": "glm", "minimax_m2": "minimax"}


def config_json(family: str, size: str, vocab_size: int, bos: int, eos: int) -> dict[str, Any]:
    """The config.json of a random `family` checkpoint at `size`."""
    if family not in _DIMS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILY_NAMES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    hidden, layers, heads, kv_heads, expert_width, other_width = _DIMS[family][size]
    common = {
        "vocab_size": vocab_size, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": "silu",
        "initializer_range": 0.02, "bos_token_id": bos, "eos_token_id": eos, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "attention_dropout": 0.0,
    }
    build = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe,
             "deepseek_v2": _deepseek_v2, "deepseek_v3": _deepseek_v3, "glm4_moe": _glm4_moe,
             "minimax_m2": _minimax_m2}[family]
    return dict(sorted((common | build(size, hidden, expert_width, other_width)).items()))


def _mixtral(size, hidden, expert_width, _):
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "intermediate_size": expert_width,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None, "router_aux_loss_coef": 0.02,
        "output_router_logits": False,
    }


def _qwen2_moe(size, hidden, expert_width, shared_width):
    return {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "intermediate_size": shared_width,
        "moe_intermediate_size": expert_width, "shared_expert_intermediate_size": shared_width,
        "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False, "decoder_sparse_step": 1,
        "max_position_embeddings": 8192, "max_window_layers": 21, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "sliding_window": 32768, "use_sliding_window": False, "router_aux_loss_coef": 0.001,
        "output_router_logits": False,
    }


def _qwen3_moe(size, hidden, expert_width, dense_width):
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "intermediate_size": dense_width,
        "moe_intermediate_size": expert_width, "head_dim": 2 * hidden // _DIMS["qwen3_moe"][size][2],
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "attention_bias": False, "max_position_embeddings": 40960, "max_window_layers": 48,
        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_scaling": None, "sliding_window": None,
        "use_sliding_window": False, "router_aux_loss_coef": 0.001, "output_router_logits": False,
    }


def _olmoe(size, hidden, expert_width, _):
    return {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "intermediate_size": expert_width,
        "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "attention_bias": False,
        "clip_qkv": None, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": None, "router_aux_loss_coef": 0.01, "output_router_logits": False,
    }


def _mla(family, size):
    q_lora, kv_lora, nope, rope, v = _MLA[family][size]
    return {"q_lora_rank": q_lora, "kv_lora_rank": kv_lora, "qk_nope_head_dim": nope, "qk_rope_head_dim": rope,
            "v_head_dim": v, "attention_bias": False, "rope_theta": 10000, "max_position_embeddings": 163840,
            "rms_norm_eps": 1e-6, "moe_layer_freq": 1, "pretraining_tp": 1}


def _deepseek_v2(size, hidden, expert_width, dense_width):
    # DeepSeek-V2-Lite: no q-LoRA, greedy softmax routing, YaRN with mscale 0.707.
    return _mla("deepseek_v2", size) | {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "intermediate_size": dense_width,
        "moe_intermediate_size": expert_width, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
        "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "aux_loss_alpha": 0.001, "seq_aux": True,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    }


def _deepseek_v3(size, hidden, expert_width, dense_width):
    return _mla("deepseek_v3", size) | {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "intermediate_size": dense_width,
        "moe_intermediate_size": expert_width, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 1, "n_group": 8, "topk_group": 4,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": 1, "ep_size": 1,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    }


def _glm4_moe(size, hidden, expert_width, dense_width):
    # GLM-4.5 (GLM-4.5-Air and 4.6/4.7 differ in counts, not in kind). partial_rotary_factor at the top,
    # as the released config.json has it; the multi-token-prediction layer is stored after the last one.
    return {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "head_dim": _HEAD_DIM["glm4_moe"][size],
        "intermediate_size": dense_width, "moe_intermediate_size": expert_width, "n_routed_experts": 160,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "n_group": 1, "topk_group": 1,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 1, "attention_bias": True,
        "use_qk_norm": False, "partial_rotary_factor": 0.5, "rope_theta": 1000000, "rope_scaling": None,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    }


def _minimax_m2(size, hidden, expert_width, _):
    # MiniMax-M2's config.json spells partial rotary as rotary_dim and names its routing and q/k norms in
    # fields transformers fixes by family (scoring_func, use_routing_bias, qk_norm_type); they are kept as
    # written. use_mtp and num_mtp_modules describe multi-token-prediction modules that transformers never
    # builds; make-model writes no weights for them.
    head_dim = _HEAD_DIM["minimax_m2"][size]
    layers = _DIMS["minimax_m2"][size][1]
    return {
        "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "head_dim": head_dim,
        "intermediate_size": expert_width, "num_local_experts": 256, "num_experts_per_tok": 8,
        "rotary_dim": head_dim // 2, "rope_theta": 5000000, "use_qk_norm": True, "qk_norm_type": "per_layer",
        "scoring_func": "sigmoid", "use_routing_bias": True, "shared_intermediate_size": 0,
        "attn_type_list": [1] * layers, "use_mtp": True, "num_mtp_modules": 3, "mtp_transformer_layers": 1,
        "max_position_embeddings": 196608, "rms_norm_eps": 1e-6, "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0, "output_router_logits": False,
    }
