"""`make_model(quantization="fp8")`: the checkpoint's format, checked against its files and transformers.

Oracles: the safetensors headers and config.json re-read from disk, the shapes and dtypes written out
here, and transformers' own FP8 module tree (what `from_pretrained` builds on a GPU before reading a
single tensor: the quantizer swaps linears for FP8Linear / FP8Experts unless modules_to_not_convert
names them), built on the meta device so that no GPU is needed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.quantizers.auto import AutoHfQuantizer

from moegen.checkpoints.make import make_model
from moegen.checkpoints.specs import FAMILY_NAMES

# The linear weights of every family as transformers names them on disk (eh_proj, DeepSeek-V3's
# multi-token-prediction projection, is bfloat16 in the real checkpoint); routers and gates are not.
LINEAR = re.compile(r"\.((q|k|v|o|q_a|q_b|kv_b|gate|up|down)_proj|kv_a_proj_with_mqa|w[123])\.weight$"
                    r"|\.experts\.(gate_up|down)_proj$")
# Per family: the expert width and expert count fields, for a fused checkpoint (width: a multiple of 128).
FUSED_FIELDS = {"mixtral": ("intermediate_size", "num_local_experts"), "olmoe": ("intermediate_size", "num_experts"),
                "qwen2_moe": ("moe_intermediate_size", "num_experts"), "qwen3_moe": ("moe_intermediate_size", "num_experts"),
                "deepseek_v2": ("moe_intermediate_size", "n_routed_experts"),
                "deepseek_v3": ("moe_intermediate_size", "n_routed_experts"),
                "glm4_moe": ("moe_intermediate_size", "n_routed_experts"),
                "minimax_m2": ("intermediate_size", "num_local_experts")}


def fused_overrides(family: str) -> dict:
    width, count = FUSED_FIELDS[family]
    return {width: 128, count: 16}


def disk(model_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape), from the files' headers."""
    out = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                out[name] = (part.get_dtype(), tuple(part.get_shape()))
    return out


def config_of(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def transformers_fp8_tree(model_dir: Path, quantization_config: dict | None = None) -> dict[str, torch.Tensor]:
    """The parameters transformers' FP8 model of `model_dir` has (meta tensors), with config.json's
    quantization_config or the one given."""
    config = AutoConfig.from_pretrained(model_dir)
    quantizer = AutoHfQuantizer.from_config(quantization_config or config.quantization_config, pre_quantized=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    quantizer._process_model_before_weight_loading(model)  # the swap from_pretrained does before loading
    return model.state_dict()


def in_model(name: str, layers: int) -> bool:
    """False for DeepSeek-V3's multi-token-prediction layers, which transformers leaves out."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is None or int(m.group(1)) < layers


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fp8_files_quantize_the_linears_alone(family, tiny_checkpoint):
    path = tiny_checkpoint(family, quantization="fp8")
    tensors = disk(path)
    weights = {n: v for n, v in tensors.items() if not n.endswith("_scale_inv")}
    quantized = sorted(n for n, (dtype, _) in weights.items() if dtype == "F8_E4M3")
    assert quantized == sorted(n for n in weights if LINEAR.search(n))
    assert set(tensors) - set(weights) == {n + "_scale_inv" for n in quantized}  # one scale each, nothing else
    for name in quantized:
        dtype, (rows, cols) = tensors[name + "_scale_inv"]
        _, (O, I) = tensors[name]
        assert dtype == "F32" and (rows, cols) == (math.ceil(O / 128), math.ceil(I / 128)), name
    for name, (dtype, _) in weights.items():
        if name not in quantized:
            assert dtype == ("F32" if name.endswith("e_score_correction_bias") else "BF16"), name
    gates = sorted(n.removesuffix(".weight") for n in weights if n.endswith("shared_expert_gate.weight"))
    assert config_of(path)["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", *gates]}
    assert (family == "qwen2_moe") == bool(gates)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fused_fp8_files_are_transformers_fp8_model(family, tiny_checkpoint):
    path = tiny_checkpoint(family, "fused", quantization="fp8", **fused_overrides(family))
    layers = config_of(path)["num_hidden_layers"]
    files = {n: v for n, v in disk(path).items() if in_model(n, layers)}
    tree = transformers_fp8_tree(path)
    assert sorted(files) == sorted(tree)
    assert any(n.endswith("experts.gate_up_proj_scale_inv") for n in tree)
    for name, (dtype, shape) in files.items():
        assert tuple(tree[name].shape) == shape, name
        assert (tree[name].dtype == torch.float8_e4m3fn) == (dtype == "F8_E4M3"), name
        if name.endswith("_scale_inv"):
            assert tree[name].dtype == torch.float32 and dtype == "F32", name


def test_modules_to_not_convert_keep_lm_head_and_the_shared_gate_unquantized(tiny_checkpoint):
    """transformers would quantize both without the list: shared_expert_gate is an nn.Linear, and a list
    without lm_head replaces the default that keeps it."""
    path = tiny_checkpoint("qwen2_moe", quantization="fp8")
    gate = "model.layers.0.mlp.shared_expert_gate"
    as_written = transformers_fp8_tree(path)
    assert as_written[gate + ".weight"].dtype != torch.float8_e4m3fn and gate + ".weight_scale_inv" not in as_written
    assert "lm_head.weight_scale_inv" not in as_written
    scheme = config_of(path)["quantization_config"]
    unlisted = transformers_fp8_tree(path, {k: v for k, v in scheme.items() if k != "modules_to_not_convert"})
    assert gate + ".weight_scale_inv" in unlisted and "lm_head.weight_scale_inv" not in unlisted
    gates_only = transformers_fp8_tree(path, scheme | {"modules_to_not_convert": scheme["modules_to_not_convert"][1:]})
    assert "lm_head.weight_scale_inv" in gates_only


@pytest.mark.parametrize("family, field, fix", [("qwen3_moe", "moe_intermediate_size", 128),
                                                ("mixtral", "intermediate_size", 256)])
def test_fused_fp8_needs_the_expert_width_on_the_block_grid(family, field, fix, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError) as caught:
        make_model(out, family, expert_layout="fused", quantization="fp8")
    assert f"--set {field}={fix}" in str(caught.value) and "multiple of 128" in str(caught.value)
    assert not out.exists()  # refused before anything is written


def test_sharded_fp8_index_counts_the_bytes(tmp_path):
    made = make_model(tmp_path / "sharded", "deepseek_v3", seed=2, max_shard_bytes=200_000, quantization="fp8")
    plain = make_model(tmp_path / "plain", "deepseek_v3", seed=2, max_shard_bytes=200_000)
    assert len(made.files) > 1 and made.bytes_on_disk == sum(f.stat().st_size for f in made.files)
    index = json.loads((made.path / "model.safetensors.index.json").read_text())
    tensors = disk(made.path)
    sizes = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    assert index["metadata"]["total_size"] == sum(sizes[d] * math.prod(s) for d, s in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    assert made.parameters == plain.parameters and made.bytes_on_disk < 0.75 * plain.bytes_on_disk
    assert made.min_expert_load >= 1  # the routers were balanced on the quantized model
