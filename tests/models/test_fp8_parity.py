"""Greedy parity with transformers on FP8 block-scaled checkpoints, both expert layouts.

transformers on a CPU dequantizes FP8 at load time (accelerate needed), taking each tensor's block size
as its rows ÷ its scale grid's rows: it mis-blocks (or refuses) any quantized dimension that isn't a
multiple of 128, so every checkpoint here is sized by config overrides to have none (partial blocks are
tested against a hand dequantization in test_fp8_loader.py). Oracles: transformers, and the files'
FP8 bytes and scales dequantized by hand.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moegen.formats import fp8
from moegen.models.families import FAMILIES, FUSED_NAMES
from fp8_oracle import FP8_PARITY, IDS, dequantize_by_hand
from test_parity import check_family



def file_tensors(model_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    return tensors


def raw(t: torch.Tensor) -> torch.Tensor:
    """t's bytes, for an exact comparison (float8 has no torch.equal)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def layer_of(name: str) -> int:
    return int(re.match(r"model\.layers\.(\d+)\.", name).group(1))


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize("family, overrides", FP8_PARITY, ids=IDS)
def test_fp8_greedy_parity(family, overrides, layout, tiny_checkpoint):
    path = tiny_checkpoint(family, layout, quantization="fp8", **overrides)
    off_grid = [f"{n} {list(t.shape)}" for n, t in file_tensors(path).items()
                if t.dtype == torch.float8_e4m3fn and (t.shape[-1] % 128 or t.shape[-2] % 128)]
    assert not off_grid, f"transformers would mis-block these; adjust the overrides: {off_grid}"
    # transformers (5.17 to 5.24) dequantizes only `…weight` + `…weight_scale_inv` pairs on a CPU: a fused file's
    # `experts.gate_up_proj_scale_inv` is left over as an unexpected key and its e4m3 values used unscaled. The
    # oracle of the fused file is transformers on the per-expert file of the same seed, the same model
    # (test_fused_file_holds_the_per_expert_bytes).
    check_family(path, oracle_path=tiny_checkpoint(family, "per-expert", quantization="fp8", **overrides))


@pytest.mark.parametrize("family, overrides", FP8_PARITY, ids=IDS)
def test_fused_file_holds_the_per_expert_bytes(family, overrides, tiny_checkpoint):
    per_expert = file_tensors(tiny_checkpoint(family, "per-expert", quantization="fp8", **overrides))
    fused = file_tensors(tiny_checkpoint(family, "fused", quantization="fp8", **overrides))
    checked = 0
    for name, expected in per_expert.items():
        hit = expert_part(family, name.removesuffix(fp8.SCALE_SUFFIX))
        if hit is None:  # not an expert's: the same tensor in both files, its router names per layout
            assert torch.equal(raw(fused[renamed_fused(family, name)]), raw(expected)), name
            continue
        prefix, e, part = hit
        suffix = fp8.SCALE_SUFFIX if fp8.is_scale_name(name) else ""  # the FP8 data, or its scales
        got = fused[prefix + FUSED_NAMES["down_proj" if part == "down_proj" else "gate_up_proj"] + suffix][e]
        if part != "down_proj":  # gate rows, then up rows (each a whole number of 128-row blocks)
            half = len(got) // 2
            got = got[:half] if part == "gate_proj" else got[half:]
        assert torch.equal(raw(got), raw(expected)), name
        checked += 1
    assert checked


def expert_part(family: str, name: str) -> tuple[str, int, str] | None:
    """(layer prefix, expert, gate_proj/up_proj/down_proj) of a per-expert file's expert weight, by the family's
    table of names; None for any other tensor."""
    templates = FAMILIES[family].moe_names(fused=False)
    for part in ("gate_proj", "up_proj", "down_proj"):
        pattern = r"(model\.layers\.\d+\.)" + re.escape(templates[part]).replace(re.escape("{e}"), r"(\d+)") + "$"
        if m := re.match(pattern, name):
            return m.group(1), int(m.group(2)), part
    return None


def renamed_fused(family: str, name: str) -> str:
    """A per-expert file's non-expert tensor's name in the fused file (a router or its bias may move)."""
    per_expert, fused = FAMILIES[family].moe_names(fused=False), FAMILIES[family].moe_names(fused=True)
    for key in ("gate", "e_score_correction_bias"):
        if key in per_expert and (m := re.match(r"(model\.layers\.\d+\.)" + re.escape(per_expert[key]) + "$", name)):
            return m.group(1) + fused[key]
    return name


@pytest.mark.parametrize("family, overrides", FP8_PARITY, ids=IDS)
def test_transformers_dequantizes_the_files_fp8_bytes(family, overrides, tiny_checkpoint):
    path = tiny_checkpoint(family, quantization="fp8", **overrides)
    hf, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    layers = hf.config.num_hidden_layers
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(layer_of(n) >= layers for n in info["unexpected_keys"]), info["unexpected_keys"]  # MTP heads only
    disk = file_tensors(path)

    def by_hand(name: str) -> torch.Tensor:
        data, scale = disk[name], disk[fp8.scale_name(name)]
        assert data.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and not (scale == 1).all(), name
        return dequantize_by_hand(data, scale)

    state = hf.state_dict()
    checked = 0
    for name in disk:
        if fp8.is_scale_name(name) or disk[name].dtype != torch.float8_e4m3fn or layer_of(name) >= layers:
            continue
        hit = expert_part(family, name)
        if hit is None:
            assert torch.equal(state[name], by_hand(name)), name
        else:  # transformers holds the experts fused, under its own names (FUSED_NAMES), whatever the family
            prefix, e, part = hit
            if part == "down_proj":
                assert torch.equal(state[prefix + FUSED_NAMES["down_proj"]][e], by_hand(name)), name
            else:
                gate_up = state[prefix + FUSED_NAMES["gate_up_proj"]][e]
                half = len(gate_up) // 2
                got = gate_up[:half] if part == "gate_proj" else gate_up[half:]
                assert torch.equal(got, by_hand(name)), name
        checked += 1
    assert checked > 20
