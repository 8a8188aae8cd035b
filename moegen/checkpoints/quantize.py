"""`make-model --quantization fp8`: a made checkpoint's linear weights in the FP8 block-scaled format.

What is quantized is what the released FP8 checkpoints quantize: every linear weight make-model draws
(attention projections, MLA's kv_b_proj, dense MLPs, routed experts in either layout, shared experts),
each written as F8_E4M3 with its F32 `…_scale_inv` sibling (moegen.formats.fp8 knows the format). Norms,
routers, the score-correction bias, embeddings and lm_head stay as before; so do the linears the
checkpoint keeps unquantized (Qwen2-MoE's [1, H] shared_expert_gate), which config.json's
`modules_to_not_convert` lists together with lm_head.

Order: the linears are quantized once, the drawn tensors are overwritten with their dequantized values
(so the routers are balanced on the model the file will hold), and that same quantization is written:
quantizing a dequantized value again may round differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor

from moegen.config import ModelConfig
from moegen.formats import fp8
from moegen.formats.fp8 import BlockFp8, Fp8Scheme

Quantization = Literal["none", "fp8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
# transformers keeps lm_head unquantized by default only when the config lists no module at all; a list
# (Qwen2-MoE's shared_expert_gate) replaces that default, so lm_head is always named, as Qwen3's FP8 configs do.
ALWAYS_NOT_CONVERTED = ("lm_head",)


def check_quantizable(quantization: str, cfg: ModelConfig, raw_config: dict, fused: bool) -> None:
    """Refuse, before anything is written, a quantization make-model can't write for this config."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none" or cfg.moe is None or not fused:
        return
    width, rows = cfg.moe.expert_intermediate, fp8.BLOCK[0]
    if width % rows:
        field = "moe_intermediate_size" if "moe_intermediate_size" in raw_config else "intermediate_size"
        fix = (width // rows + 1) * rows
        raise ValueError(f"a fused FP8 checkpoint needs {field} (the expert width, {width}) to be a multiple of "
                         f"{rows}: a {rows}-row scale block of gate_up_proj must not straddle its gate and up "
                         f"halves; pass --set {field}={fix}, or --expert-layout per-expert")


def scheme_of_made(kept_plain: set[str]) -> Fp8Scheme:
    """The quantization_config of a made FP8 checkpoint whose `kept_plain` linear weights stay unquantized."""
    modules = ALWAYS_NOT_CONVERTED + tuple(sorted(fp8.module_of(name) for name in kept_plain))
    return Fp8Scheme(block=fp8.BLOCK, not_converted=modules)


def quantize_linears(tensors: dict[str, Tensor], names: set[str]) -> dict[str, BlockFp8]:
    """Quantize tensors[name] for each of `names`; each tensor is overwritten in place with its dequantized
    value (float32), so every view of it (the model's units) computes with what the file will hold."""
    quantized = {}
    for name in sorted(names):
        t = tensors[name]
        quantized[name] = q = fp8.quantize(t)
        t.copy_(fp8.dequantize(q, torch.float32))
    return quantized


def stored_form(name: str, t: Tensor, quantized: dict[str, BlockFp8]) -> dict[str, Tensor]:
    """The tensor(s) written for `name`: the FP8 data and its scales, or `t` in bfloat16 (the score-correction
    bias in float32, as DeepSeek-V3 stores it)."""
    if name in quantized:
        return fp8.parts(name, quantized[name])
    return {name: (t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)).contiguous()}


def add_quantization_config(out: Path, scheme: Fp8Scheme) -> None:
    """config.json of `out` gains the scheme's quantization_config."""
    path = Path(out) / "config.json"
    raw = json.loads(path.read_text())
    raw["quantization_config"] = scheme.config_json()
    path.write_text(json.dumps(raw, indent=2) + "\n")
