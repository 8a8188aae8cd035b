"""torch's block-scaled FP8 GEMM, DeepSeek-V3's recipe: activations quantized on the fly in 1x128 blocks
(`activation_scheme: dynamic`), weights in the checkpoint's 128x128 blocks as they are stored.

torch's API for it moved between versions: 2.6 has `torch._scaled_mm` with tensor- and row-wise float32
scales only; later ones take 1x128 x 128x128 float32 scales in `_scaled_mm` (on SM90 with cuBLASLt >= 12.9),
and newer ones also in `torch.nn.functional.scaled_mm` with the recipes named. Which of them the installed
torch takes, on this device, is found by calling them (`probe`), never by reading version numbers: each of
FORMS is tried on a small problem and the first whose result matches `emulated` is used; what each one
raised is kept word for word.

Layouts both forms read (torch's ScaledBlas.cpp): a = q [T, K] float8 row-major with scales [T, K/128]
column-major (stride (1, T)); b = w.data.t() [K, N], column-major because the stored weight is [N, K]
row-major, with scales w.scale.t() [K/128, N/128] (the stored [N/128, K/128] row-major grid, transposed;
`nn.functional.scaled_mm` wants K/128 to be a multiple of 4, which every shape here is).

Letters: T tokens (rows), K input features, N output features, C = K/128 scale blocks per row.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moegen.formats import fp8
from moegen.models.weights import MLPWeights

Mm = Callable[[Tensor, Tensor, fp8.BlockFp8, torch.dtype], Tensor]  # (q, q's scales, w, out dtype) -> [T, N]
ACT_BLOCK = 128  # activation elements one scale covers (along K): DeepSeek-V3's 1x128
PROBE_SHAPE = (128, 512, 256)  # T, K, N: the smallest the layouts allow with K/128 a multiple of 4
MISREAD = 0.1  # a probe result this far from the emulation (relative to its max |value|) read the scales wrong:
# the probe's weight blocks differ in magnitude by up to 2^7, so a misread grid is off by O(1), while a right one
# differs only by accumulation order and the output's rounding (~1e-2 at the most in bfloat16)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [T, K] -> (q [T, K] float8_e4m3fn, scales [T, C] float32, column-major): each 1x128 block's scale is its
    largest |x| / 448 (1 for an all-zero block), its elements x / scale rounded to e4m3."""
    T, K = x.shape
    if K % ACT_BLOCK:
        raise ValueError(f"activations of {K} features: a block-scaled GEMM needs a multiple of {ACT_BLOCK}")
    blocks = x.float().view(T, K // ACT_BLOCK, ACT_BLOCK)  # [T, C, 128]
    amax = blocks.abs().amax(dim=-1)  # [T, C]
    scale = torch.where(amax > 0, amax / fp8.FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale.unsqueeze(-1)).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8).view(T, K)
    return q, scale.t().contiguous().t()  # [T, C] with stride (1, T): "outer-dim-major", as the GEMM reads it


def emulated(q: Tensor, scale: Tensor, w: fp8.BlockFp8, dtype: torch.dtype) -> Tensor:
    """What any correct block-scaled GEMM gives, up to accumulation order: both operands dequantized to
    float32, multiplied in float32 (the caller turns TF32 off), the product rounded to `dtype` once."""
    T, K = q.shape
    a = (q.float().view(T, K // ACT_BLOCK, ACT_BLOCK) * scale.unsqueeze(-1)).view(T, K)  # [T, K]
    return (a @ fp8.dequantize(w, torch.float32).t()).to(dtype)  # [T, N]


def _scaled_mm(q: Tensor, scale: Tensor, w: fp8.BlockFp8, dtype: torch.dtype) -> Tensor:
    return torch._scaled_mm(q, w.data.t(), scale_a=scale, scale_b=w.scale.t(), out_dtype=dtype)


def _functional(q: Tensor, scale: Tensor, w: fp8.BlockFp8, dtype: torch.dtype) -> Tensor:
    recipe = F.ScalingType  # absent before the functional API: the probe records the AttributeError
    return F.scaled_mm(q, w.data.t(), scale, recipe.BlockWise1x128, w.scale.t(), recipe.BlockWise128x128,
                       output_dtype=dtype)


FORMS: dict[str, Mm] = {"torch._scaled_mm": _scaled_mm, "torch.nn.functional.scaled_mm": _functional}


def probe(device: str, dtype: torch.dtype) -> tuple[Mm | None, dict[str, str]]:
    """(the first of FORMS that computes a block-scaled GEMM right on `device`, or None; what each form did:
    "ok: …", "misread: …" or the exception it raised, word for word)."""
    T, K, N = PROBE_SHAPE
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(T, K, generator=gen)
    magnitude = 2.0 ** torch.randint(0, 8, (N // 128, K // 128), generator=gen)  # [N/128, C] per weight block
    w = torch.randn(N, K, generator=gen) * magnitude.repeat_interleave(128, 0).repeat_interleave(128, 1)
    q, scale = quantize_rows(x.to(device))
    weight = fp8.quantize(w.to(device))
    want = emulated(q, scale, weight, torch.float32)
    chosen, said = None, {}
    for name, mm in FORMS.items():
        try:
            got = mm(q, scale, weight, dtype).float()
        except Exception as exc:  # what this torch says it can't do: recorded as said, the next form tried
            said[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            continue
        off = relative_error(got, want)
        said[name] = f"{'ok' if off < MISREAD else 'misread'}: max |error| {off:.1e} of max |emulated|"
        if off < MISREAD and chosen is None:
            chosen = mm
    return chosen, said


def swiglu(w: MLPWeights, x: Tensor, mm: Mm) -> Tensor:
    """models.moe.mlp's SwiGLU, x [T, H] -> down(silu(gate x) * up x) [T, H], over FP8 weights (each field a
    BlockFp8) through `mm`: x quantized once for gate and up, the [T, I] intermediate once for down."""
    q, scale = quantize_rows(x)
    h = F.silu(mm(q, scale, w.gate_proj, x.dtype), inplace=True).mul_(mm(q, scale, w.up_proj, x.dtype))  # [T, I]
    return mm(*quantize_rows(h), w.down_proj, x.dtype)


def relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want| (a `.item()`: a sync, outside anything timed)."""
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)).item()
