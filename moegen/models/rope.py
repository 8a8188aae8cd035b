"""RMSNorm and rotary position embeddings (default and YaRN; rotate-half and interleaved; full or partial).

Letters: T tokens, N heads, D head dim, R rotary dims (R <= D).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moegen.config import RopeConfig


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x · rsqrt(mean(x²) + eps) · weight, reduced in float32 as transformers does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def inv_freq(cfg: RopeConfig) -> Tensor:
    """[R/2] inverse frequencies; YaRN blends interpolated and extrapolated ones per dim."""
    exponents = torch.arange(0, cfg.dim, 2, dtype=torch.float32) / cfg.dim
    pos_freqs = cfg.theta**exponents
    if cfg.kind == "default":
        return 1.0 / pos_freqs
    low, high = _yarn_correction_range(cfg)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(cfg.dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the trained frequency (high-frequency dims)
    return (1.0 / (cfg.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def _yarn_correction_range(cfg: RopeConfig) -> tuple[float, float]:
    def dim_for(rotations: float) -> float:
        return (cfg.dim * math.log(cfg.original_max_positions / (rotations * 2 * math.pi))) / (2 * math.log(cfg.theta))

    low, high = dim_for(cfg.beta_fast), dim_for(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, cfg.dim - 1)


class Rope:
    """Rotates q/k by their positions. One per model; holds only the [R/2] frequency table."""

    def __init__(self, cfg: RopeConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.inv_freq = inv_freq(cfg).to(device)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """[T] positions -> cos, sin [T, R/2], scaled by the YaRN attention factor."""
        angles = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]  # [T, R/2]
        return angles.cos() * self.cfg.attention_factor, angles.sin() * self.cfg.attention_factor

    def apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [T, N, D]: its first R dims rotated, the other D - R passed through (GLM, MiniMax-M2).
        Interleaved inputs come out de-interleaved (first all x0', then x1'), as transformers'
        DeepSeek-V3 does; q and k share the layout, so q·k is unchanged."""
        cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # [T, 1, R/2]
        R = self.cfg.dim
        if self.cfg.interleaved:
            x1, x2 = x[..., 0:R:2], x[..., 1:R:2]  # [T, N, R/2] each
        else:
            x1, x2 = x[..., : R // 2], x[..., R // 2 : R]  # [T, N, R/2] each
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., R:]), dim=-1)  # [T, N, D]
