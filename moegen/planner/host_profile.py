"""How long decode attention takes on the host worker (`runtime.host_attention`): measured over a synthetic
paged cache in host memory, on the calibration's grid of (sequences, context), and fitted like the device's
attention: seconds ~ a + p*b + q*b*c. The host's cores are the host's whatever the device is, so this is
measured on the cpu for cuda profiles too."""

from __future__ import annotations

import torch

from moegen.config import MLAConfig, ModelConfig
from moegen.models.kv_cache import layer_kv
from moegen.planner.calibrate import DECODE, Linear, timed
from moegen.planner.profile import _fit
from moegen.runtime.host_attention.attend import HostDecode, gqa_decode, mla_decode

BLOCK = 16  # tokens per block of the synthetic cache (the default --kv-block-size)


def measure_host_attention(cfg: ModelConfig, dtype: torch.dtype, threads: int | None = None) -> Linear:
    """seconds of one layer's host decode attention for b sequences of c cached tokens, fitted over DECODE."""
    a = cfg.attention
    rows, times = [], []
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for b, c in DECODE:
            n = -(-(c + 1) // BLOCK)
            kv = layer_kv(a, b * n, BLOCK, dtype, "cpu")  # every sequence's blocks, in order
            blocks = torch.arange(b * n).view(b, n)
            slots = blocks[:, c // BLOCK] * BLOCK + c % BLOCK
            part = HostDecode(blocks, slots, [c] * b)
            times.append(timed(_decode(cfg, kv, part, b, dtype), "cpu"))
            rows.append([1.0, float(b), float(b * c)])
    finally:
        torch.set_num_threads(before)
    return Linear(_fit(rows, times))


def _decode(cfg: ModelConfig, kv, part: HostDecode, b: int, dtype: torch.dtype):
    a = cfg.attention

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype)

    if isinstance(a, MLAConfig):
        args = (randn(b, a.num_heads, a.kv_lora_rank), randn(b, a.num_heads, a.qk_rope_head_dim),
                randn(b, a.kv_lora_rank), randn(b, a.qk_rope_head_dim))
        return lambda: mla_decode(a, kv, part, *args)
    args = (randn(b, a.num_heads, a.head_dim), randn(b, a.num_kv_heads, a.head_dim),
            randn(b, a.num_kv_heads, a.head_dim))
    return lambda: gqa_decode(a, kv, part, *args, None)
