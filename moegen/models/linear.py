"""x Wᵀ + b, for a weight as loaded or reordered once for oneDNN's cpu matmul.

torch's F.linear on the cpu calls its BLAS (MKL in the x86 wheels), whose GEMMs over a few hundred
rows run well below peak on the AMD EPYC cores we measure on; oneDNN's matmul (the kernel torch's own
compiler uses for cpu linears) over a weight reordered once into its blocked layout is faster:
[256, 768] x [768, 32000] (a Mixtral-like lm_head over a decode step's 256 sequences) 162 vs 223
GFLOP/s on 2 cores, [64, 768] x [768, 2688] 131 vs 197. Reordering on every call (a plain weight
passed to oneDNN) is not: in a run it cost more than it saved. Results differ from F.linear's by
float rounding (~1e-6 relative).

bfloat16 weights are reordered too where the CPU does bf16 arithmetic itself (AVX-512-BF16 or AMX):
there F.linear already reaches oneDNN's bf16 kernel, but reorders the weight on every call; [24, 1024]
x [1024, 2816] (a DeepSeek-V2-Lite-like expert's decode tokens) 0.76 ms plain, 0.44 reordered, and
float32's 0.83 (same 2 cores). The results are F.linear's, bit for bit. Without native bf16 oneDNN
emulates it, and nothing is reordered.

Letters: T rows (tokens), I input features, O output features.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `pack_linear` reorders weights of this device and dtype: on the cpu, torch built with oneDNN,
    float32, or bfloat16 where the CPU has native bf16."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and native_bf16())


@functools.cache
def native_bf16() -> bool:
    """Whether the CPU reports bf16 arithmetic (AVX-512-BF16 or AMX-BF16) in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pack_linear(w: Tensor) -> Tensor:
    """w [O, I] reordered for oneDNN (an opaque tensor only `linear` reads) where `can_pack`; else w itself."""
    if w.is_mkldnn or not can_pack(w.device, w.dtype):
        return w
    return torch.ops.mkldnn._reorder_linear_weight(w)


def plain(w: Tensor) -> Tensor:
    """w in the plain [O, I] layout (undoes `pack_linear`)."""
    return w.to_dense() if w.is_mkldnn else w


ROWS_BUCKET = 128  # above this many rows, a reordered weight's inputs are padded to a multiple of it


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x [T, I], w [O, I] (plain, or from `pack_linear`), b [O] -> [T, O].

    oneDNN keeps a primitive, with its own scratch memory, for every input shape it has seen (up
    to 1,024); prefill steps hand each expert its own token count, so large inputs are padded with
    zero rows to a multiple of ROWS_BUCKET (`bucket_rows`): a few shapes instead of hundreds (the
    bench Mixtral-like serve-offline job held 2.60 GiB at its peak without this)."""
    if not w.is_mkldnn:
        return F.linear(x, w, b)
    return torch.ops.mkldnn._linear_pointwise(bucket_rows(x, w).contiguous(), w, b, "none", [], "")[: len(x)]


def bucket_rows(x: Tensor, w: Tensor) -> Tensor:
    """x [T, I], with zero rows appended up to the row count `linear` runs a reordered `w` at ([T', I]; x
    itself where that is T). Linears chained over the result pad once instead of at each step, and
    their padding rows stay zero through a SwiGLU; slice [:T] at the end."""
    T = len(x)
    if not w.is_mkldnn or T <= ROWS_BUCKET or T % ROWS_BUCKET == 0:
        return x
    padded = x.new_empty(-(-T // ROWS_BUCKET) * ROWS_BUCKET, x.shape[1])  # [T', I]
    padded[:T] = x
    padded[T:].zero_()
    return padded
