"""FP8 block-scaled weights, as DeepSeek-V3/R1, Qwen3-MoE FP8, GLM-4.5 FP8 and MiniMax-M2 ship them.

On disk: config.json's `quantization_config` says `"quant_method": "fp8"`, `"weight_block_size": [128, 128]`,
`"activation_scheme": "dynamic"`; each quantized linear's `…weight` (F8_E4M3, [O, I], or [E, O, I] in the fused
expert layout) has a sibling `…weight_scale_inv` (F32, [ceil(O/128), ceil(I/128)]): the weight is
`fp8 × weight_scale_inv`, block by block (the name is historical). A partial last block is real (DeepSeek-V3's
kv_a_proj_with_mqa has 576 rows: 5 block rows).

This module is the only one that knows the format: its config fields and on-disk names, the loaded form
(`BlockFp8`: the FP8 elements and their scales, which the host block and the link carry as they are), its
dequantization (on the device, right before use) and its quantization (make-model, --weight-dtype fp8).

Letters: O output rows, I input columns, E experts, R = ceil(O/BR) block rows, C = ceil(I/BC) block columns.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3fn value
BLOCK = (128, 128)  # rows, columns of the weight one scale covers: the only block size moegen reads
SCALE_SUFFIX = "_scale_inv"  # `…weight` -> `…weight_scale_inv`; fused `…gate_up_proj` -> `…gate_up_proj_scale_inv`
FORMATS = ("e4m3", "float8_e4m3fn")  # the spellings of the one FP8 format moegen reads
SCALE_FORMATS = ("float", "ue8m0")  # ue8m0: float32 scales that are powers of two (DeepSeek-V3.1), read alike


class QuantizationError(ValueError):
    """config.json's quantization_config asks for something moegen doesn't read: names the field and value."""


@dataclass(frozen=True, slots=True)
class Fp8Scheme:
    """A checkpoint's `quantization_config`, validated."""

    block: tuple[int, int]  # rows, columns per scale
    not_converted: tuple[str, ...] = ()  # module names stored unquantized (`modules_to_not_convert`)

    def config_json(self) -> dict:
        """The `quantization_config` a checkpoint in this scheme carries (make-model writes it)."""
        q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(self.block)}
        return q | ({"modules_to_not_convert": list(self.not_converted)} if self.not_converted else {})


def scheme_of(raw_config: dict, path: Path) -> Fp8Scheme | None:
    """The FP8 scheme of a parsed config.json (None: not quantized); anything else is an error naming the field."""
    q = raw_config.get("quantization_config")
    if q is None:
        return None
    where = f"{path}: quantization_config"
    if not isinstance(q, dict):
        raise QuantizationError(f"{where} must be a JSON object, found {type(q).__name__}")
    checks = {
        "quant_method": (q.get("quant_method"), ("fp8",)),
        "fmt": (q.get("fmt", "e4m3"), FORMATS),
        "activation_scheme": (q.get("activation_scheme", "dynamic"), ("dynamic",)),
        "scale_fmt": (q.get("scale_fmt") or "float", SCALE_FORMATS),
    }
    for field, (value, allowed) in checks.items():
        if value not in allowed:
            raise QuantizationError(f"{where}.{field} is {value!r}; moegen reads FP8 block-scaled checkpoints with "
                                    f"{field} in {list(allowed)} (dequantize the checkpoint to bfloat16 to run it)")
    block = q.get("weight_block_size")
    if block is None or list(block) != list(BLOCK):
        raise QuantizationError(f"{where}.weight_block_size is {block!r}; moegen reads {list(BLOCK)} blocks only "
                                "(dequantize the checkpoint to bfloat16 to run it)")
    skip = q.get("modules_to_not_convert") or ()
    if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
        raise QuantizationError(f"{where}.modules_to_not_convert must be a list of module names, found {skip!r}")
    return Fp8Scheme(block=tuple(BLOCK), not_converted=tuple(skip))


@dataclass(slots=True)
class BlockFp8:
    """One quantized linear weight as stored: `data` × `scale`, block by block."""

    data: Tensor  # [O, I] (or [E, O, I]) float8_e4m3fn
    scale: Tensor  # [R, C] (or [E, R, C]) float32: the multiplier of each block (`weight_scale_inv`)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def numel(self) -> int:
        """Weights (parameters) it stands for: a launch over t tokens is 2 * t * this many FLOPs."""
        return self.data.numel()

    @property
    def nbytes(self) -> int:
        """What it takes in host memory and on the link: one byte a weight, four a block."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def rows(self, first: int, last: int) -> BlockFp8:
        """Rows [first, last) of a [O, I] weight (a fused gate_up_proj's gate or up half); both ends on block edges."""
        br = BLOCK[0]
        if first % br or (last % br and last != self.data.shape[-2]):
            raise QuantizationError(f"rows {first}:{last} of an FP8 weight of shape {list(self.shape)} cut a {br}-row "
                                    "scale block; a fused gate_up_proj needs moe_intermediate_size to be a multiple "
                                    f"of {br}")
        return BlockFp8(self.data[..., first:last, :], self.scale[..., first // br: -(-last // br), :])

    def __getitem__(self, expert: int) -> BlockFp8:
        """Expert `expert` of a fused [E, O, I] weight."""
        return BlockFp8(self.data[expert], self.scale[expert])


def scale_grid(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scale tensor's shape for a weight of `shape` ([..., O, I] -> [..., R, C])."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / BLOCK[0]), math.ceil(cols / BLOCK[1]))


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def is_scale_name(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def module_of(weight_name: str) -> str:
    """The module a weight belongs to (`model.layers.0.mlp.gate.weight` -> `model.layers.0.mlp.gate`)."""
    return re.sub(r"\.weight$", "", weight_name)


def dequantize(w: BlockFp8, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """w as a plain [.., O, I] tensor in `dtype` (into `out` when given): each element times its block's scale,
    computed in float32 and rounded once (what transformers' dequantizer gives, bit for bit)."""
    out = torch.empty(w.shape, dtype=dtype, device=w.data.device) if out is None else out
    *lead, O, I = w.shape
    br, bc = BLOCK
    if O % br == 0 and I % bc == 0:
        blocked = (*lead, O // br, br, I // bc, bc)
        # [.., R, br, C, bc] * [.., R, 1, C, 1]; the float32 product is rounded into out's dtype once
        torch.mul(w.data.view(blocked).to(torch.float32), w.scale.unsqueeze(-1).unsqueeze(-3), out=out.view(blocked))
        return out
    scale = w.scale.repeat_interleave(br, -2)[..., :O, :].repeat_interleave(bc, -1)[..., :I]  # [.., O, I]
    torch.mul(w.data.to(torch.float32), scale, out=out)
    return out


def quantize(w: Tensor) -> BlockFp8:
    """w [.., O, I] in blocks: each block's scale is its largest |w| / 448 (1 for an all-zero block), its
    elements w / scale rounded to e4m3 (the convention of the released checkpoints)."""
    *lead, O, I = w.shape
    br, bc = BLOCK
    R, C = math.ceil(O / br), math.ceil(I / bc)
    padded = w.new_zeros((*lead, R * br, C * bc), dtype=torch.float32)
    padded[..., :O, :I] = w
    blocks = padded.view(*lead, R, br, C, bc)  # [.., R, br, C, bc]
    amax = blocks.abs().amax(dim=(-3, -1))  # [.., R, C]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    data = (blocks / scale.unsqueeze(-1).unsqueeze(-3)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return BlockFp8(data.view(*lead, R * br, C * bc)[..., :O, :I].contiguous(), scale.contiguous())


# -- the host layout: a quantized field is two parts of its module's block, its elements and its scales ----------

def parts(name: str, value: Tensor | BlockFp8, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The tensors a field is kept as: a plain one (in `dtype`, when given), or a BlockFp8's elements and scales."""
    if isinstance(value, BlockFp8):
        return {name: value.data, name + SCALE_SUFFIX: value.scale}
    return {name: value if dtype is None else value.to(dtype)}


def assemble(tensors: dict[str, Tensor]) -> dict[str, Tensor | BlockFp8]:
    """`parts` undone: fields by name, a field with scales as a BlockFp8."""
    out: dict[str, Tensor | BlockFp8] = {}
    for name, t in tensors.items():
        if not name.endswith(SCALE_SUFFIX):
            scale = tensors.get(name + SCALE_SUFFIX)
            out[name] = t if scale is None else BlockFp8(t, scale)
    return out


def work_numel(unit) -> int:
    """Elements a unit's quantized fields take dequantized (the working buffer a slot needs for it)."""
    return sum(v.numel() for f in fields(unit) if isinstance(v := getattr(unit, f.name), BlockFp8))


def work_views(unit, work: Tensor):
    """The unit with each quantized field replaced by a view of `work` (a flat run-dtype buffer of at least
    `work_numel(unit)` elements) that `dequantize_into` fills; its other fields as they are."""
    views, off = {}, 0
    for f in fields(unit):
        v = getattr(unit, f.name)
        if isinstance(v, BlockFp8):
            views[f.name] = work[off: off + v.numel()].view(v.shape)
            off += v.numel()
    return replace(unit, **views)


def dequantize_into(unit, out) -> None:
    """Fill `out` (from `work_views(unit, …)`) with the dequantized fields of `unit`."""
    for f in fields(unit):
        v = getattr(unit, f.name)
        if isinstance(v, BlockFp8):
            target = getattr(out, f.name)
            dequantize(v, target.dtype, out=target)


def has_fp8(unit) -> bool:
    return any(isinstance(getattr(unit, f.name), BlockFp8) for f in fields(unit))


def plain(unit, dtype: torch.dtype):
    """A weights dataclass with every BlockFp8 field dequantized to `dtype` (the unit itself when it has none)."""
    quantized = {f.name: v for f in fields(unit) if isinstance(v := getattr(unit, f.name), BlockFp8)}
    return replace(unit, **{k: dequantize(v, dtype) for k, v in quantized.items()}) if quantized else unit

