"""--weight-dtype: which linears a load quantizes, what they then weigh, and what the run reports."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from moegen.formats.fp8 import BlockFp8, dequantize
from moegen.models.loader import load_checkpoint
from moegen.runtime.config import RuntimeConfig


def fp8_bytes(shape) -> int:
    """One byte per weight, four per 128x128 block (a partial one too)."""
    return shape[0] * shape[1] + 4 * math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128)


def test_fp8_quantizes_the_routed_experts_only(tiny_checkpoint):
    path = tiny_checkpoint("deepseek_v3")
    cfg, weights, report = load_checkpoint(path, torch.float32, "fp8")
    experts = [e for lw in weights.layers if lw.moe for e in lw.moe.experts]
    linears = [getattr(e, f) for e in experts for f in ("gate_proj", "up_proj", "down_proj")]
    assert all(isinstance(w, BlockFp8) for w in linears)
    for lw in weights.layers:  # attention, dense MLP, shared experts, routers stay plain
        assert isinstance(lw.attn.kv_b_proj, torch.Tensor) and isinstance(lw.attn.o_proj, torch.Tensor)
        for unit in (lw.mlp, lw.moe and lw.moe.shared):
            assert unit is None or isinstance(unit.down_proj, torch.Tensor)
    assert report.quantized.tensors == len(linears)
    assert report.quantized.bytes_before == sum(4 * w.numel() for w in linears)
    assert report.quantized.bytes_after == sum(fp8_bytes(w.shape) for w in linears)
    # each one is the file's weight within e4m3's rounding (3 mantissa bits)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored = f.get_tensor(name).float()
    back = dequantize(weights.layers[1].moe.experts[3].down_proj, torch.float32)
    assert (back - stored).abs().max() <= stored.abs().max() / 16


def test_fp8_all_quantizes_every_linear_but_routers_and_lm_head(tiny_checkpoint):
    cfg, weights, report = load_checkpoint(tiny_checkpoint("deepseek_v3"), torch.float32, "fp8-all")
    for lw in weights.layers:
        for field in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            assert isinstance(getattr(lw.attn, field), BlockFp8), field
        assert isinstance(lw.attn.kv_a_layernorm, torch.Tensor)
        for unit in (lw.mlp, lw.moe and lw.moe.shared):
            assert unit is None or isinstance(unit.gate_proj, BlockFp8)
        assert lw.moe is None or isinstance(lw.moe.router.gate, torch.Tensor)
    assert isinstance(weights.lm_head, torch.Tensor) and isinstance(weights.embed_tokens, torch.Tensor)
    assert "attention, MLP and expert" in report.quantized.note


def test_auto_keeps_a_plain_checkpoint_plain(tiny_checkpoint):
    _, weights, report = load_checkpoint(tiny_checkpoint("mixtral"), torch.float32, "auto")
    assert report.quantized is None and isinstance(weights.layers[0].moe.experts[0].gate_proj, torch.Tensor)


def test_an_unknown_weight_dtype_is_refused():
    with pytest.raises(ValueError, match="--weight-dtype must be one of auto, fp8, fp8-all"):
        RuntimeConfig(weight_dtype="int4")


def test_serve_offline_says_and_records_what_it_quantized(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from moegen.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hello"}\n{"prompt": "a b c"}\n')
    stats = tmp_path / "stats.json"
    result = CliRunner().invoke(main, ["serve-offline", str(tiny_checkpoint("mixtral")), "--dataset", str(data),
                                       "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "4", "--no-plan",
                                       "--weight-dtype", "fp8", "--stats-json", str(stats)])
    assert result.exit_code == 0, result.output
    assert "--weight-dtype fp8: quantized 48 routed experts' linears" in result.output  # 2 layers x 8 experts x 3
    summary = json.loads(stats.read_text())
    assert summary["weight_dtype"] == "fp8" and summary["quantized"]["tensors"] == 48
