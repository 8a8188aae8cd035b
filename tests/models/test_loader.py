"""Tests for moegen.models.loader against files re-read from disk and against transformers.

Oracles: the safetensors files themselves (read back with `safe_open` / `load_file`), config.json
re-read as JSON, and transformers (`from_pretrained` with `output_loading_info=True`, and the two
`save_pretrained` formats). Checkpoints are made once per module and copied before corrupting.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from checkpoint_files import (ERROR_FAMILY, MTP_FAMILIES, config_of, disk_shapes, disk_tensor, mtp_prefix,
                              rewrite_single_file)
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moegen.config import ConfigError
from moegen.models.loader import CheckpointError, load_checkpoint


# ----------------------------------------------------------------------------------------------
# Error cases: exception type and a message naming the offending thing.


def test_missing_expert_tensor(corrupt):
    name = "model.layers.1.mlp.experts.7.up_proj.weight"
    rewrite_single_file(corrupt, lambda t: t.pop(name))
    assert name not in disk_shapes(corrupt)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert repr(name) in msg and "missing" in msg
    cfg = config_of(corrupt)
    assert str([cfg["intermediate_size"], cfg["hidden_size"]]) in msg  # the shape it expected


def test_misshaped_tensor_names_both_shapes(corrupt):
    cfg = config_of(corrupt)
    H, I = cfg["hidden_size"], cfg["intermediate_size"]  # OLMoE: intermediate_size is one expert's width
    name = "model.layers.0.mlp.experts.5.down_proj.weight"
    assert disk_shapes(corrupt)[name] == (H, I)
    rewrite_single_file(corrupt, lambda t: t.__setitem__(name, torch.zeros(H, I + 3, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert repr(name) in msg
    assert str([H, I + 3]) in msg and str([H, I]) in msg


@pytest.mark.parametrize("extra", ["expert past num_experts", "layer past num_hidden_layers"])
def test_unexpected_tensor_is_named(corrupt, extra):
    cfg = config_of(corrupt)
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    if extra == "expert past num_experts":
        name, shape = f"model.layers.0.mlp.experts.{cfg['num_experts']}.gate_proj.weight", (I, H)
    else:  # only DeepSeek-V3 stores (and skips) layers past the end
        name, shape = f"model.layers.{cfg['num_hidden_layers']}.input_layernorm.weight", (H,)
        # transformers agrees that it is not part of the model.
        rewrite_single_file(corrupt, lambda t: t.__setitem__(name, torch.ones(shape, dtype=torch.bfloat16)))
        _, info = AutoModelForCausalLM.from_pretrained(str(corrupt), dtype=torch.float32, output_loading_info=True)
        assert name in info["unexpected_keys"]
    rewrite_single_file(corrupt, lambda t: t.__setitem__(name, torch.ones(shape, dtype=torch.bfloat16)))
    assert name in disk_shapes(corrupt)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert repr(name) in msg and "unexpected" in msg and "model.safetensors" in msg


# GLM-4-MoE and MiniMax-M2 names: (family, layout, make_model kwargs, tensor, its expected shape from config.json).
MISSING = {
    "minimax_m2 router bias": ("minimax_m2", "per-expert", {}, "model.layers.1.block_sparse_moe.e_score_correction_bias",
                               lambda c: [c["num_local_experts"]]),
    "minimax_m2 fused router bias": ("minimax_m2", "fused", {}, "model.layers.0.mlp.e_score_correction_bias",
                                     lambda c: [c["num_local_experts"]]),
    "minimax_m2 whole-projection k_norm": ("minimax_m2", "per-expert", {}, "model.layers.0.self_attn.k_norm.weight",
                                           lambda c: [c["num_key_value_heads"] * c["head_dim"]]),
    "glm4_moe router bias": ("glm4_moe", "per-expert", {}, "model.layers.4.mlp.gate.e_score_correction_bias",
                             lambda c: [c["n_routed_experts"]]),
    "glm4_moe shared expert": ("glm4_moe", "per-expert", {}, "model.layers.3.mlp.shared_experts.down_proj.weight",
                               lambda c: [c["hidden_size"], c["moe_intermediate_size"] * c["n_shared_experts"]]),
    "glm4_moe dense layer": ("glm4_moe", "per-expert", {}, "model.layers.2.mlp.up_proj.weight",
                             lambda c: [c["intermediate_size"], c["hidden_size"]]),
    "glm4_moe per-head k_norm": ("glm4_moe", "per-expert", {"overrides": {"use_qk_norm": True}},
                                 "model.layers.1.self_attn.k_norm.weight", lambda c: [c["head_dim"]]),
    "glm4_moe q bias": ("glm4_moe", "per-expert", {}, "model.layers.0.self_attn.q_proj.bias",
                        lambda c: [c["num_attention_heads"] * c["head_dim"]]),
}


@pytest.mark.parametrize("case", sorted(MISSING))
def test_missing_tensor_of_the_newer_families_is_named(private_copy, case):
    family, layout, kwargs, name, shape = MISSING[case]
    path = private_copy(family, layout, **kwargs)
    assert name in disk_shapes(path)
    rewrite_single_file(path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert repr(name) in msg and "missing" in msg and str(shape(config_of(path))) in msg


@pytest.mark.parametrize("family, name", [
    ("glm4_moe", "model.layers.0.self_attn.o_proj.bias"),  # attention_bias gives q/k/v a bias, never o_proj
    ("glm4_moe", "model.layers.0.self_attn.q_norm.weight"),  # use_qk_norm is false in GLM-4.5's config
    ("glm4_moe", "model.layers.0.mlp.gate.weight"),  # a dense layer (first_k_dense_replace) has no router
    ("minimax_m2", "model.layers.0.mlp.gate.e_score_correction_bias"),  # the bias is the block's, not the router's
])
def test_unexpected_tensor_of_the_newer_families_is_named(private_copy, family, name):
    path = private_copy(family)
    shape = (config_of(path)["hidden_size"],)
    rewrite_single_file(path, lambda t: t.__setitem__(name, torch.ones(shape, dtype=torch.bfloat16)))
    _, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert name in info["unexpected_keys"]  # transformers agrees it is no part of the model
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert repr(name) in msg and "unexpected" in msg


def test_rotary_inv_freq_is_skipped_like_transformers(corrupt):
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite_single_file(corrupt, lambda t: t.__setitem__(name, torch.ones(8)))
    _, info = AutoModelForCausalLM.from_pretrained(str(corrupt), dtype=torch.float32, output_loading_info=True)
    assert name not in info["unexpected_keys"] and not info["missing_keys"]  # transformers ignores it silently
    _, _, report = load_checkpoint(corrupt)
    assert report.skipped == [name]
    assert name not in report.loaded


def test_unsupported_architecture(corrupt):
    cfg = config_of(corrupt) | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (corrupt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert "'llama'" in msg and "LlamaForCausalLM" in msg
    assert "config.json" in msg
    assert "mixtral" in msg  # lists what is supported


def test_pickle_only_directory(corrupt):
    tensors = load_file(str(corrupt / "model.safetensors"))
    (corrupt / "model.safetensors").unlink()
    torch.save(tensors, corrupt / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg


def test_index_lists_a_missing_shard(made, tmp_path):
    src = made(ERROR_FAMILY, max_shard_bytes=200_000).path
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    gone = shards[1]
    (dst / gone).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(dst)
    msg = str(exc.value)
    assert gone in msg and "model.safetensors.index.json" in msg
    assert not any(s in msg for s in shards if s != gone)  # names only the missing one


@pytest.mark.parametrize("index_text", ["[1]", '{"weight_map": ["a"]}', '{"weight_map": {"x": 3}}', "{"])
def test_malformed_index_is_a_checkpoint_error(made, tmp_path, index_text):
    dst = tmp_path / "sharded"
    shutil.copytree(made(ERROR_FAMILY, max_shard_bytes=200_000).path, dst)
    (dst / "model.safetensors.index.json").write_text(index_text)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a safetensors index"):
        load_checkpoint(dst)


@pytest.mark.parametrize("text", ["[]", "3", '"olmoe"'])
def test_config_json_that_is_not_an_object(corrupt, text):
    (corrupt / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_checkpoint(corrupt)


def test_invalid_config_json(corrupt):
    (corrupt / "config.json").write_text('{"model_type": "olmoe", "hidden_size": 64,')  # truncated
    with pytest.raises(ConfigError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert str(corrupt / "config.json") in msg and "JSON" in msg


def test_missing_config_json(corrupt):
    (corrupt / "config.json").unlink()
    with pytest.raises(ConfigError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert str(corrupt / "config.json") in msg and "not found" in msg


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints.


def test_sharded_equals_single_file(made):
    single = made(ERROR_FAMILY).path
    sharded = made(ERROR_FAMILY, max_shard_bytes=200_000).path
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_files = sorted(sharded.glob("*.safetensors"))
    assert len(shard_files) >= 3 and not (sharded / "model.safetensors").exists()
    assert {p.name for p in shard_files} == set(index["weight_map"].values())
    assert set(index["weight_map"]) == set(disk_shapes(sharded)) == set(disk_shapes(single))
    for path in shard_files:  # each shard within the limit (a lone tensor may exceed it; none does here)
        with safe_open(str(path), framework="pt") as f:
            assert sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys()) <= 200_000

    _, w1, r1 = load_checkpoint(single)
    _, ws, rs = load_checkpoint(sharded)
    assert [p.name for p in rs.files] == [p.name for p in shard_files]
    assert rs.loaded == r1.loaded
    pairs = {
        "model.embed_tokens.weight": (w1.embed_tokens, ws.embed_tokens),
        "lm_head.weight": (w1.lm_head, ws.lm_head),
        "model.norm.weight": (w1.norm, ws.norm),
        "model.layers.1.self_attn.k_proj.weight": (w1.layers[1].attn.k_proj, ws.layers[1].attn.k_proj),
        "model.layers.1.mlp.experts.33.down_proj.weight": (w1.layers[1].moe.experts[33].down_proj,
                                                           ws.layers[1].moe.experts[33].down_proj),
        "model.layers.0.mlp.gate.weight": (w1.layers[0].moe.router.gate, ws.layers[0].moe.router.gate),
    }
    for name, (a, b) in pairs.items():
        assert torch.equal(a, b), name
        assert torch.equal(b, disk_tensor(sharded, name).float()), name  # and equal to the file's bytes


# ----------------------------------------------------------------------------------------------
# The load report.


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "glm4_moe"])
def test_report_loaded_is_everything_on_disk(made, family):
    path = made(family).path
    on_disk = set(disk_shapes(path))
    _, _, report = load_checkpoint(path)
    assert report.loaded == on_disk - set(report.skipped)
    assert not report.loaded & set(report.skipped)
    assert report.expert_layout == "per-expert"
    prefix = mtp_prefix(path)
    mtp = {n for n in on_disk if n.startswith(prefix)}
    if family in MTP_FAMILIES:
        assert mtp and {"enorm.weight", "hnorm.weight", "eh_proj.weight"} <= {n[len(prefix):] for n in mtp}
        assert set(report.skipped) == mtp and len(report.skipped) == len(mtp)
        layer = prefix.split(".")[2]
        assert f"skipped {len(mtp)} tensors" in report.note and f"layers {layer}" in report.note
        assert "multi-token-prediction" in report.note
    else:
        assert not mtp
        assert report.skipped == [] and report.note == ""


