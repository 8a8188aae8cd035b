"""--kv-dtype fp8: the KV cache in FP8 e4m3, one float32 scale per layer and kv head (GQA keys and values) or per
layer (MLA's latent and rope key), each fixed by the first launch that writes the layer (a prefill).

Where it sits: the host cache, the staging buffers and the link hold e4m3 (1 byte an element, half of bf16's);
inside each attention launch the staged entries are dequantized into a work buffer in the run dtype, which the
attention reads and extends, and its new entries are quantized back to e4m3 for the write-back. A launch
attends to its own new entries unquantized; later launches read them through e4m3.

Why per kv head for GQA: heads differ in range (a few carry outlier channels), and a head's scale costs 4
bytes per layer. MLA's latent is one normalized vector shared by every head, and its rope key one head, so a
scale per layer each. Why fixed, not per block: a block's bytes then mean one thing for the whole run, shared
prefix blocks and recomputed ones alike, and neither the gather nor the scatter touches a scale.

Letters: t new tokens, b sequences, S' staged positions, G kv heads, D head dim, C latent rank, R rope dim.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from moegen.config import MLAConfig, ModelConfig
from moegen.formats.fp8 import FP8, FP8_MAX
from moegen.models.kv_cache import GQALayerKV, LayerKV, MLALayerKV
from moegen.runtime.config import RuntimeConfig

# The first prefill's peak maps to FP8_MAX / HEADROOM, so later tokens up to HEADROOM times its range are kept,
# beyond that they saturate. Keys and values of later tokens come from the same projections of inputs whose
# norms RMSNorm fixes, so their range grows with the content, not the position (RoPE rotates pairs, never
# lengthens them); a short first prompt can still miss an outlier channel. 2 costs one of e4m3's 17 binades
# (2^-9 .. 448), at the small end: values under 2^-13.8 of the peak become subnormal (2^-14.8 without headroom),
# under 2^-17.8 zero; and no precision: the relative step, 2^-3, is the same in every normal binade.
HEADROOM = 2.0
NOTE = ("KV cache in FP8 e4m3 (lossy; --kv-dtype fp8: scales per layer, and per kv head for GQA, fixed by each "
        "layer's first prefill; half of bf16's host and link bytes per token)")
# A layer whose first prefill wrote only zeros: its scale stays positive (no 0/0 = NaN when quantizing).
SCALE_FLOOR = torch.finfo(torch.float32).tiny


@dataclass(slots=True)
class KVFp8:
    """The FP8 KV cache's scales and which layers have theirs fixed; asked by the stager inside each launch."""

    scales: list[LayerKV]  # per layer, float32 on the device: GQA k, v [G, 1] (per kv head), MLA latent, k_rope []
    fixed: list[bool]  # per layer, host-side: a launch that fixes its scales has been submitted (for the engine's
    # life: blocks of shared prefixes outlive a run, and their bytes mean what these scales say)

    @classmethod
    def allocate(cls, cfg: ModelConfig, device: torch.device) -> KVFp8:
        a = cfg.attention

        def scale(*shape: int) -> Tensor:
            return torch.ones(shape, dtype=torch.float32, device=device)

        layer = ((lambda: MLALayerKV(latent=scale(), k_rope=scale())) if isinstance(a, MLAConfig)
                 else (lambda: GQALayerKV(k=scale(a.num_kv_heads, 1), v=scale(a.num_kv_heads, 1))))
        return cls([layer() for _ in range(cfg.num_layers)], [False] * cfg.num_layers)

    def claim(self, layer: int) -> bool:
        """Whether the launch about to be submitted for `layer` fixes its scales: the first one does. Launches of
        a layer are submitted in this order and run in it on the compute stream, so every later one reads them
        after the first has written them (on the device: no sync)."""
        first, self.fixed[layer] = not self.fixed[layer], True
        return first

    def dequantize(self, layer: int, stored: LayerKV, work: LayerKV) -> None:
        """Inside the launch: e4m3 `stored` -> `work` in the run dtype, [b, S', ...] per tensor (in place: no
        allocation; e4m3 values are exact in every run dtype)."""
        for f in fields(work):
            dequantize(getattr(stored, f.name), getattr(self.scales[layer], f.name), getattr(work, f.name))

    def quantize(self, layer: int, new: LayerKV, out: LayerKV, fix: bool) -> None:
        """Inside the launch: the new entries `new` (run dtype, [t, 1, ...]; overwritten) -> e4m3 `out`, after
        fixing the layer's scales from them when `fix`."""
        for f in fields(new):
            x, scale = getattr(new, f.name), getattr(self.scales[layer], f.name)
            if fix:
                fix_scale(x, scale)
            quantize(x, scale, getattr(out, f.name))


def fix_scale(x: Tensor, scale: Tensor) -> None:
    """scale <- the peak |x| per scale entry / FP8_MAX * HEADROOM, floored: x [t, 1, G, D] -> scale [G, 1],
    x [t, 1, C] -> scale []. On the device, no sync; max and -min rather than abs: no copy of x."""
    flat = x.flatten(0, x.dim() - scale.dim() - 1)  # [t, G, D] / [t * C]
    peak = torch.maximum(flat.amax(0), flat.amin(0).neg())  # [G, D] / []
    spread = [i for i, n in enumerate(scale.shape) if n == 1]  # the dims one scale covers (D)
    if spread:
        peak = peak.amax(spread, keepdim=True)  # [G, 1]
    scale.copy_((peak.float() * (HEADROOM / FP8_MAX)).clamp_(min=SCALE_FLOOR))


def quantize(x: Tensor, scale: Tensor, out: Tensor) -> None:
    """x / scale -> e4m3 `out`, saturating at ±FP8_MAX (e4m3fn has no infinity: past it would be NaN). Divides x
    in place (it is the launch's scratch)."""
    out.copy_(x.div_(scale).clamp_(-FP8_MAX, FP8_MAX))


def dequantize(stored: Tensor, scale: Tensor, out: Tensor) -> None:
    """e4m3 `stored` * scale -> `out` (run dtype)."""
    out.copy_(stored).mul_(scale)


def staged_element_bytes(rcfg: RuntimeConfig) -> int:
    """Device bytes per staged KV element: the stored one, and with FP8 its dequantized copy in the run dtype."""
    run = rcfg.torch_dtype.itemsize
    return run if rcfg.kv_dtype == "auto" else FP8.itemsize + run


def scale_bytes(cfg: ModelConfig, rcfg: RuntimeConfig) -> int:
    """Device bytes of the scales (none without FP8)."""
    if rcfg.kv_dtype == "auto":
        return 0
    a = cfg.attention
    per_layer = 2 if isinstance(a, MLAConfig) else 2 * a.num_kv_heads
    return per_layer * cfg.num_layers * torch.float32.itemsize
