"""Which linears of a loaded model are kept FP8: `--weight-dtype`, and the walk back to plain weights.

`auto` keeps every tensor as the checkpoint stores it (an FP8 checkpoint's linears stay FP8). `fp8` quantizes
the routed experts of a bf16/fp32 checkpoint at load into the block format real FP8 checkpoints use
(`formats.fp8`), `fp8-all` every linear but the routers and lm_head. Quantizing is lossy and opt-in: the load
says what it did (`Quantized.note`), and the job's stats record it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from moegen.formats.fp8 import BlockFp8, has_fp8, plain, quantize
from moegen.models.linear import plain as plain_layout

WEIGHT_DTYPES = ("auto", "fp8", "fp8-all")


@dataclass(slots=True)
class Quantized:
    """What `--weight-dtype` quantized at load."""

    choice: str  # fp8 or fp8-all
    tensors: int  # linears quantized
    bytes_before: int  # their bytes as loaded (the run dtype)
    bytes_after: int  # as FP8 elements + float32 block scales

    @property
    def note(self) -> str:
        what = "routed experts'" if self.choice == "fp8" else "attention, MLP and expert"
        return (f"--weight-dtype {self.choice}: quantized {self.tensors} {what} linears to FP8 (128x128 blocks) at load, "
                f"{self.bytes_before / 2**20:.1f} -> {self.bytes_after / 2**20:.1f} MiB; lossy: completions may "
                "differ from the unquantized model's")


def apply_weight_dtype(weights, choice: str) -> Quantized | None:
    """Quantize `weights` (ModelWeights, in place) as `choice` asks; None when nothing was quantized (`auto`, or
    the linears asked for are FP8 already)."""
    if choice not in WEIGHT_DTYPES:
        raise ValueError(f"--weight-dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {choice!r}")
    if choice == "auto":
        return None
    done = Quantized(choice, 0, 0, 0)
    for lw in weights.layers:
        units = list(lw.moe.experts) if lw.moe is not None else []
        if choice == "fp8-all":
            units += [u for u in (lw.attn, lw.mlp, lw.moe.shared if lw.moe else None) if u is not None]
        for unit in units:
            _quantize_unit(unit, done)
    return done if done.tensors else None


def _quantize_unit(unit, done: Quantized) -> None:
    for f in fields(unit):
        w = getattr(unit, f.name)
        if w is None or isinstance(w, BlockFp8) or w.dim() != 2:
            continue  # FP8 already, or a norm or bias
        q = quantize(plain_layout(w))
        done.tensors += 1
        done.bytes_before += w.numel() * w.element_size()
        done.bytes_after += q.nbytes
        setattr(unit, f.name, q)


def fp8_kinds(weights) -> str:
    """Which kinds of streamable module hold FP8 linears ("attn,expert,mlp"; "" for none): launch times differ."""
    kinds = set()
    for lw in weights.layers:
        for kind, unit in (("attn", lw.attn), ("mlp", lw.mlp), ("mlp", lw.moe and lw.moe.shared),
                           ("expert", lw.moe and lw.moe.experts[0])):
            if unit is not None and has_fp8(unit):
                kinds.add(kind)
    return ",".join(sorted(kinds))


def plain_model(weights):
    """ModelWeights with every quantized linear dequantized to the dtype of its norms (the run dtype); the
    weights themselves when none is quantized."""
    units = [u for lw in weights.layers for u in (lw.attn, lw.mlp, *(lw.moe.experts + [lw.moe.shared] if lw.moe else ()))]
    if not any(has_fp8(u) for u in units if u is not None):
        return weights
    dtype = weights.norm.dtype
    layers = []
    for lw in weights.layers:
        moe = lw.moe
        if moe is not None:
            moe = replace(moe, experts=[plain(e, dtype) for e in moe.experts],
                          shared=None if moe.shared is None else plain(moe.shared, dtype))
        layers.append(replace(lw, attn=plain(lw.attn, dtype), moe=moe, mlp=None if lw.mlp is None else plain(lw.mlp, dtype)))
    return replace(weights, layers=layers)
