"""x Wᵀ + b, for a weight as loaded or reordered once for oneDNN's cpu matmul.

torch's F.linear on the cpu calls its BLAS (MKL in the x86 wheels), whose GEMMs over a few hundred
rows run well below peak on the AMD EPYC cores we measure on; oneDNN's matmul (the kernel torch's own
compiler uses for cpu linears) over a weight reordered once into its blocked layout is faster:
[256, 768] x [768, 32000] (a Mixtral-like lm_head over a decode step's 256 sequences) 162 vs 223
GFLOP/s on 2 cores, [64, 768] x [768, 2688] 131 vs 197. Reordering on every call (a plain weight
passed to oneDNN) is not: in a run it cost more than it saved. Results differ from F.linear's by
float rounding (~1e-6 relative).

Letters: T rows (tokens), I input features, O output features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `pack_linear` reorders weights of this device and dtype: float32 on the cpu, torch built with oneDNN."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


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
