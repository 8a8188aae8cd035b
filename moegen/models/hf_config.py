"""Read a Hugging Face `config.json` into moegen's config dataclasses.

transformers reads the file (it owns defaults and legacy spellings, so an ambiguous field means
what it means there, e.g. rope_scaling -> rope_parameters); this module copies what the model
units need, family by family.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from moegen.config import ConfigError, GQAConfig, MLAConfig, ModelConfig, MoEConfig, RopeConfig, RouterConfig
from moegen.models.families import Family, family_for


def read_config_json(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; a model directory needs config.json (a Hugging Face checkpoint)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); fix it, or copy config.json from the checkpoint "
                          "again") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a JSON object of config fields, found {type(raw).__name__}")
    return raw


def generation_eos_ids(model_dir: Path, cfg: ModelConfig) -> tuple[int, ...]:
    """EOS ids generation stops on: generation_config.json's, else config.json's (as transformers does)."""
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc}); fix it, or remove it to stop on config.json's "
                              "eos_token_id") from exc
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (int(eos),)
    return cfg.eos_token_ids


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read `model_dir/config.json` through transformers and normalise it."""
    raw = read_config_json(model_dir)
    family = family_for(raw, Path(model_dir) / "config.json")
    from transformers import AutoConfig  # configs and tokenizers are all moegen takes from transformers

    try:
        hf = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # transformers (and huggingface_hub's strict dataclasses) validate types and values
        raise ConfigError(f"{Path(model_dir) / 'config.json'}: transformers can't read it as {family.name}: {exc}; "
                          "correct that in config.json") from exc
    try:
        return from_hf_config(hf, family)
    except ConfigError as exc:  # its checks name a field, not the file
        raise ConfigError(f"{Path(model_dir) / 'config.json'}: {exc}") from exc


def from_hf_config(hf, family: Family) -> ModelConfig:
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (only silu, which the {family.name} family always "
                          'uses); set "hidden_act": "silu"')
    n_layers = hf.num_hidden_layers
    attention = _mla(hf) if family.attention == "mla" else _gqa(hf, family)
    eos = hf.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return ModelConfig(
        family=family.name,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=n_layers,
        rms_norm_eps=hf.rms_norm_eps,
        attention=attention,
        moe=_moe(hf, family),
        dense_intermediate=hf.intermediate_size,
        moe_layers=tuple(_is_moe_layer(hf, family, layer) for layer in range(n_layers)),
        sliding_windows=tuple(_sliding_window(hf, family, layer) for layer in range(n_layers)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        max_position_embeddings=hf.max_position_embeddings,
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=eos_ids,
        extra_layers=int(getattr(hf, "num_nextn_predict_layers", 0) or 0) if family.skips_layers_past_end else 0,
    )


def _rope(hf, dim: int, interleaved: bool) -> RopeConfig:
    params = dict(hf.rope_parameters or {})
    kind = params.get("rope_type", "default")
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    if kind == "default":
        return RopeConfig(dim=dim, theta=theta, kind="default", interleaved=interleaved)
    if kind != "yarn":
        raise ConfigError(f"rope type {kind!r} is not supported (default and yarn are); set rope_scaling's rope_type "
                          "to one of them, or drop rope_scaling")
    factor = params.get("factor")
    original = params["original_max_position_embeddings"]
    if factor is None:
        factor = hf.max_position_embeddings / original
    return RopeConfig(
        dim=dim,
        theta=theta,
        kind="yarn",
        interleaved=interleaved,
        factor=float(factor),
        original_max_positions=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        attention_factor=_yarn_attention_factor(params, float(factor)),
        truncate=bool(params.get("truncate", True)),
    )


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_attention_factor(params: dict, factor: float) -> float:
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def _gqa(hf, family: Family) -> GQAConfig:
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    attention_bias = bool(getattr(hf, "attention_bias", False))
    qk_norm_on = family.qk_norm_flag is None or bool(getattr(hf, family.qk_norm_flag, False))
    return GQAConfig(
        hidden_size=hf.hidden_size,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=head_dim,
        qkv_bias=bool(getattr(hf, "qkv_bias", False)) or attention_bias,
        o_bias=attention_bias and family.o_proj_bias,
        qk_norm=family.qk_norm if qk_norm_on else "none",
        clip_qkv=getattr(hf, "clip_qkv", None),
        rms_norm_eps=hf.rms_norm_eps,
        rope=_rope(hf, _rotary_dim(hf, family, head_dim), interleaved=False),
    )


def _rotary_dim(hf, family: Family, head_dim: int) -> int:
    """Dims of each head that rotate: int(head_dim * partial_rotary_factor) as the family's rotary
    embedding computes it (transformers moves the factor, or its default, into rope_parameters)."""
    if not family.partial_rotary:
        return head_dim
    params = hf.rope_parameters or {}
    if "partial_rotary_factor" in params:
        return int(head_dim * params["partial_rotary_factor"])
    # MiniMax-M2's released spelling; transformers releases that don't convert it would rotate all dims.
    rotary_dim = getattr(hf, "rotary_dim", None)
    return int(rotary_dim) if rotary_dim else head_dim


def _mla(hf) -> MLAConfig:
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf, flag, False):
            raise ConfigError(f"{flag}=true is not supported for DeepSeek models (no released checkpoint uses it); "
                              f"set {flag} to false")
    rope = _rope(hf, hf.qk_rope_head_dim, interleaved=bool(getattr(hf, "rope_interleave", True)))
    scale = (hf.qk_nope_head_dim + hf.qk_rope_head_dim) ** -0.5
    params = hf.rope_parameters or {}
    if rope.kind != "default" and params.get("mscale_all_dim"):
        scale *= yarn_mscale(rope.factor, params["mscale_all_dim"]) ** 2
    return MLAConfig(
        hidden_size=hf.hidden_size,
        num_heads=hf.num_attention_heads,
        q_lora_rank=hf.q_lora_rank,
        kv_lora_rank=hf.kv_lora_rank,
        qk_nope_head_dim=hf.qk_nope_head_dim,
        qk_rope_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim,
        o_bias=False,
        scale=scale,
        rope=rope,
    )


def _moe(hf, family: Family) -> MoEConfig:
    num_experts = getattr(hf, family.num_experts_attr)
    # Sigmoid routers pick by biased scores within the best groups (noaux_tc); one group where the config has none.
    method = "noaux_tc" if family.scoring == "sigmoid" else (getattr(hf, "topk_method", None) or "greedy")
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ConfigError(f"topk_method {method!r} is not supported; set it to greedy, group_limited_greedy or noaux_tc")
    grouped = method != "greedy"
    renormalise = {"always": True, "never": False}.get(family.renormalise, bool(getattr(hf, "norm_topk_prob", False)))
    router = RouterConfig(
        num_experts=num_experts,
        top_k=hf.num_experts_per_tok,
        scoring=family.scoring,
        topk_method=method,
        norm_topk_prob=renormalise,
        routed_scaling_factor=float(getattr(hf, "routed_scaling_factor", 1.0) or 1.0),
        n_group=int(getattr(hf, "n_group", None) or 1) if grouped else 1,
        topk_group=int(getattr(hf, "topk_group", None) or 1) if grouped else 1,
        correction_bias=family.correction_bias is not None,
    )
    expert_intermediate = getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size
    if family.name == "qwen2_moe":
        shared = hf.shared_expert_intermediate_size
    elif family.shared_names:  # DeepSeek, GLM: n_shared_experts experts' width, as one MLP
        shared = hf.moe_intermediate_size * (hf.n_shared_experts or 0)
    else:
        shared = 0
    return MoEConfig(router=router, expert_intermediate=expert_intermediate, shared_intermediate=shared,
                     shared_gate=family.name == "qwen2_moe")


def _is_moe_layer(hf, family: Family, layer: int) -> bool:
    if family.moe_layers == "first_k_dense_replace":
        return layer >= (hf.first_k_dense_replace or 0)
    if family.moe_layers == "decoder_sparse_step":
        return layer not in (hf.mlp_only_layers or []) and hf.num_experts > 0 and (layer + 1) % hf.decoder_sparse_step == 0
    return True


def _sliding_window(hf, family: Family, layer: int) -> int | None:
    window = getattr(hf, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(hf, "layer_types", None)
    if family.name == "qwen2_moe":
        return window if layer_types and layer_types[layer] == "sliding_attention" else None
    return window
