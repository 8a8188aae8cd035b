"""Loading FP8 block-scaled checkpoints: partial blocks, exact bytes, and every malformed input refused.

Oracles: the safetensors files re-read with `safe_open`, and a dequantization written out here with
explicit loops over the 128 x 128 blocks (no moegen code). The broken checkpoints are copies of a made
one, edited with safetensors' `save_file` and the json module.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fp8_oracle import dequantize_by_hand

from moegen.formats import fp8
from moegen.formats.fp8 import BlockFp8, QuantizationError
from moegen.models.loader import CheckpointError, load_checkpoint
from moegen.models.reference import ReferenceModel

BLOCK = 128
# DeepSeek-V3's real MLA ranks: kv_a_proj_with_mqa has 512 + 64 = 576 rows (4.5 blocks); a hidden size
# of 200 gives every [., H] weight a partial last column block and o_proj a partial last row block.
PARTIAL = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "hidden_size": 200}
KV_A = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
ERROR_FAMILY = "qwen3_moe"  # its tiny FP8 checkpoint is the one the error cases break


def file_tensor(model_dir: Path, name: str) -> torch.Tensor:
    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name)


def rewrite(model_dir: Path, edit) -> None:
    path = Path(model_dir) / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_config(model_dir: Path, edit) -> None:
    path = Path(model_dir) / "config.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


@pytest.fixture
def partial_copy(tiny_checkpoint, tmp_path):
    dst = tmp_path / "partial"
    shutil.copytree(tiny_checkpoint("deepseek_v3", quantization="fp8", **PARTIAL), dst)
    return dst


def test_partial_blocks_dequantize_as_by_hand(tiny_checkpoint):
    path = tiny_checkpoint("deepseek_v3", quantization="fp8", **PARTIAL)
    cfg, weights, _ = load_checkpoint(path, torch.float32)
    layer = ReferenceModel(cfg, weights).w.layers[1]  # the engine's weights, dequantized once
    names = {"kv_a_proj_with_mqa": KV_A.replace("layers.0", "layers.1"),
             "o_proj": "model.layers.1.self_attn.o_proj.weight", "kv_b_proj": "model.layers.1.self_attn.kv_b_proj.weight"}
    for field, name in names.items():
        data, scale = file_tensor(path, name), file_tensor(path, fp8.scale_name(name))
        assert data.dtype == torch.float8_e4m3fn and (data.shape[0] % BLOCK or data.shape[1] % BLOCK), name
        assert torch.equal(getattr(layer.attn, field), dequantize_by_hand(data, scale)), name
    assert file_tensor(path, KV_A).shape == (576, 200)
    down = "model.layers.1.mlp.experts.3.down_proj.weight"  # [200, 12]: partial rows and columns
    assert torch.equal(layer.moe.experts[3].down_proj,
                       dequantize_by_hand(file_tensor(path, down), file_tensor(path, fp8.scale_name(down))))


def test_quantize_file_load_round_trips_the_bytes(partial_copy):
    w = 0.05 * torch.randn(576, 200, generator=torch.Generator().manual_seed(0))
    w[:128, 128:] = 0  # an all-zero (partial) block
    q = fp8.quantize(w)
    assert q.data.dtype == torch.float8_e4m3fn and tuple(q.scale.shape) == (5, 2) and q.scale[0, 1] == 1.0
    rewrite(partial_copy, lambda t: t.update({KV_A: q.data, fp8.scale_name(KV_A): q.scale}))

    _, weights, report = load_checkpoint(partial_copy, torch.float32)
    loaded = weights.layers[0].attn.kv_a_proj_with_mqa
    assert isinstance(loaded, BlockFp8) and fp8.scale_name(KV_A) in report.loaded
    assert torch.equal(loaded.data.view(torch.uint8), q.data.view(torch.uint8))
    assert torch.equal(loaded.scale, q.scale) and loaded.scale.dtype == torch.float32


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"
BROKEN_FILES = {
    "missing scale": (lambda t: t.pop(fp8.scale_name(Q_PROJ)), CheckpointError,
                      [fp8.scale_name(Q_PROJ), "missing"]),
    "scale of the wrong grid": (lambda t: t.update({fp8.scale_name(Q_PROJ): torch.ones(3, 3)}), CheckpointError,
                                [fp8.scale_name(Q_PROJ), "[3, 3]", "scale grid"]),
    "fp8 norm": (lambda t: t.update({NORM: t[NORM].to(torch.float8_e4m3fn)}), CheckpointError,
                 [NORM, "FP8", "norms"]),
}
BROKEN_CONFIGS = {
    "64x64 blocks": (lambda q: q.update(weight_block_size=[64, 64]), ["weight_block_size", "[64, 64]"]),
    "e5m2": (lambda q: q.update(fmt="e5m2"), ["fmt", "e5m2"]),
    "another method": (lambda q: q.update(quant_method="gptq"), ["quant_method", "gptq"]),
    "static activations": (lambda q: q.update(activation_scheme="static"), ["activation_scheme", "static"]),
}


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint(ERROR_FAMILY, quantization="fp8"), dst)
    return dst


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_broken_fp8_tensors_are_named(broken, case):
    edit, error, words = BROKEN_FILES[case]
    rewrite(broken, edit)
    with pytest.raises(error) as caught:
        load_checkpoint(broken)
    assert all(w in str(caught.value) for w in words), str(caught.value)


@pytest.mark.parametrize("case", sorted(BROKEN_CONFIGS))
def test_unsupported_quantization_config_is_named(broken, case):
    edit, words = BROKEN_CONFIGS[case]
    edit_config(broken, lambda raw: edit(raw["quantization_config"]))
    with pytest.raises(QuantizationError) as caught:
        load_checkpoint(broken)
    message = str(caught.value)
    assert "config.json: quantization_config" in message and all(w in message for w in words), message


def test_fp8_tensor_without_quantization_config(broken):
    edit_config(broken, lambda raw: raw.pop("quantization_config"))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(broken)
    message = str(caught.value)
    assert "F8_E4M3" in message and "no quantization_config" in message and ".weight'" in message, message
