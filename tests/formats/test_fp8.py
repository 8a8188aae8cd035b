"""The FP8 block format against arithmetic written out by hand (tests/fp8_oracle.py): block by block."""

from __future__ import annotations

import math
import re

import pytest
import torch

from fp8_oracle import dequantize_by_hand

from moegen.formats import fp8


@pytest.mark.parametrize("shape", [(576, 200), (256, 384), (64, 48), (130, 129)])
def test_dequantize_is_each_element_times_its_blocks_scale(shape):
    gen = torch.Generator().manual_seed(0)
    R, C = math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)
    data = (torch.randn(shape, generator=gen) * 100).clamp(-448, 448).to(fp8.FP8)
    scale = torch.rand(R, C, generator=gen) + 0.01
    w = fp8.BlockFp8(data, scale)
    expected = dequantize_by_hand(data, scale)
    assert fp8.scale_grid(shape) == (R, C)
    assert torch.equal(fp8.dequantize(w, torch.float32), expected)
    assert torch.equal(fp8.dequantize(w, torch.bfloat16), expected.to(torch.bfloat16))  # rounded once


def test_a_fused_weight_dequantizes_expert_by_expert():
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(3, 256, 192, generator=gen).to(fp8.FP8)
    scale = torch.rand(3, 2, 2, generator=gen)
    out = fp8.dequantize(fp8.BlockFp8(data, scale), torch.float32)
    for e in range(3):
        assert torch.equal(out[e], dequantize_by_hand(data[e], scale[e]))
        assert torch.equal(fp8.dequantize(fp8.BlockFp8(data, scale)[e], torch.float32), out[e])


def test_quantize_scales_each_block_by_its_largest_magnitude():
    w = torch.randn(300, 130, generator=torch.Generator().manual_seed(2))
    w[128:256, 128:] = 0  # an all-zero block
    q = fp8.quantize(w)
    assert q.data.dtype == fp8.FP8 and q.scale.dtype == torch.float32 and q.scale.shape == (3, 2)
    for r in range(3):
        for c in range(2):
            block = w[128 * r: 128 * (r + 1), 128 * c: 128 * (c + 1)]
            amax = block.abs().max().item()
            assert q.scale[r, c].item() == pytest.approx(amax / 448 if amax else 1.0, rel=1e-6)
    back = dequantize_by_hand(q.data, q.scale)
    # e4m3 keeps 3 mantissa bits: each element within half a step (1/16 relative) of its block's grid
    assert ((back - w).abs() <= w.abs() / 16 + q.scale.max() * 2**-9).all()
    assert q.nbytes == 300 * 130 + 4 * 6


def test_rows_keep_their_scale_rows_and_refuse_to_cut_a_block():
    q = fp8.quantize(torch.randn(2, 512, 64))[1]  # one expert of a fused gate_up_proj, I = 256
    up = q.rows(256, 512)
    assert torch.equal(fp8.dequantize(up, torch.float32), dequantize_by_hand(q.data[256:], q.scale[2:]))
    with pytest.raises(fp8.QuantizationError, match="multiple of 128"):
        fp8.quantize(torch.randn(200, 64)).rows(0, 100)


GOOD = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


@pytest.mark.parametrize("field, value", [("quant_method", "gptq"), ("fmt", "e5m2"), ("activation_scheme", "static"),
                                          ("weight_block_size", [64, 64]), ("scale_fmt", "e4m3")])
def test_an_unsupported_quantization_config_names_the_field(field, value, tmp_path):
    with pytest.raises(fp8.QuantizationError, match=re.escape(f"quantization_config.{field} is {value!r}")):
        fp8.scheme_of({"quantization_config": GOOD | {field: value}}, tmp_path / "config.json")


def test_the_released_spellings_are_read():
    for q in (GOOD, GOOD | {"fmt": "float8_e4m3fn"}, GOOD | {"scale_fmt": "ue8m0"},
              GOOD | {"modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate"]}):
        scheme = fp8.scheme_of({"quantization_config": q}, "config.json")
        assert scheme.block == (128, 128)
    assert fp8.scheme_of({}, "config.json") is None
    assert scheme.not_converted == ("lm_head", "model.layers.0.mlp.gate")
