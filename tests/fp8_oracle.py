"""The FP8 block format's arithmetic written out by hand: the oracle the FP8 tests compare moegen against."""

from __future__ import annotations

import math

import torch

BLOCK = 128


def dequantize_by_hand(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """data [O, I] (float8) times scale [ceil(O/128), ceil(I/128)], one 128x128 block at a time, in float32."""
    rows, cols = data.shape
    assert tuple(scale.shape) == (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)), (data.shape, scale.shape)
    out = torch.empty(rows, cols, dtype=torch.float32)
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            block = (slice(r * BLOCK, (r + 1) * BLOCK), slice(c * BLOCK, (c + 1) * BLOCK))
            out[block] = data[block].to(torch.float32) * scale[r, c]
    return out
