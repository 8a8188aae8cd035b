"""Stage 6, fp8: what dequantizing a streamed expert's FP8 linears costs on the device, and whether a
block-scaled FP8 GEMM could take the place of dequantize + bfloat16 GEMM.

moegen keeps FP8 block-scaled weights (moegen/formats/fp8.py) compressed in host memory and on the link,
and dequantizes a streamed module's FP8 linears on the device right before its launch, into a run-dtype
working buffer. On the expert shapes of two real models (SHAPES), in bfloat16 (dry run: toy shapes,
float32, the cpu), this stage measures for each shape:
1. `fp8.dequantize_into` of one expert's three linears into preallocated buffers: seconds and GB/s (FP8
   elements and scales read, run-dtype elements written) against the GB/s of a large device-to-device copy
   (read + written): what the memory allows.
2. one streamed expert launch as the runtime runs it (dequantize_into, then models.moe.mlp) at each T of
   TOKENS, against the same mlp over the weights already dequantized: dequantization's share of the launch.
3. where torch can (a cuda device of compute capability >= 9.0, and scaled_mm.probe finds a call that
   works), the same SwiGLU through a block-scaled FP8 GEMM, the activations quantized per 1x128 block on
   the fly: its time per launch, its max |error| against the dequantize + bfloat16 path's output, and the
   verdict a switch to it would need. moegen does not switch; this stage only measures.
Weights and activations are random normal: real activations have outlier channels (what 1x128 blocks are
for), so the errors here are the plain-noise case. Timing: device events on cuda, wall time on the cpu;
one warm-up, then the best of REPEATS.

Record: `what`, `dtype`, `copy_gbps`, `tokens`, `tolerance`, `probe` (form -> what it did, word for word),
`block_scaled_gemm` (the verdict: "faster and equal", "slower" (at some shape and T: each row's
`fp8_speedup` says where), "not equal", or "unsupported: <why>"), `headline`, and `shapes` {name: {`hidden`,
`width`, `dequant_s`, `dequant_bytes`, `dequant_gbps`, `of_copy`, `noise` (the run dtype's own max |error|
against float32 at HEADLINE_T), `rows` [{`tokens`, `launch_s`, `swiglu_s`, `dequant_share`, `swiglu_tflops`,
`act_quant_s`, `recipe_error`, `fp8_gemm_s`, `fp8_error`, `fp8_speedup`, `fp8_failed`}]}}, dequant_share being
dequant_s / launch_s and fp8_speedup launch_s / fp8_gemm_s (against the streamed launch it would replace); the
fp8_ fields are null where the GEMM was not run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import fields

import torch

from moegen.formats import fp8
from moegen.models.moe import mlp
from moegen.models.weights import MLPWeights, mlp_params
from tools.gpu_check import scaled_mm
from tools.gpu_check.options import CheckOptions
from tools.gpu_check.scaled_mm import quantize_rows, relative_error
from tools.gpu_check.stages import Outcome

SHAPES = {"deepseek_v3": (7168, 2048), "mixtral": (4096, 14336)}  # H hidden, I expert width (from config.json)
DRY_SHAPES = {"deepseek_v3": (256, 128), "mixtral": (128, 256)}  # whole 128x128 blocks, like the real ones
TOKENS = (128, 1024, 8192)  # a decode step's tokens for a hot expert, a prefill chunk's, a large prefill's
HEADLINE_T = 1024
REPEATS = 5
WEIGHT_STD = 0.02  # about what the released checkpoints' expert weights have
# "Equal" is within what bfloat16 itself does to this SwiGLU. Measured on the cpu on these shapes at T=128
# (random weights, quantized as above): the dequantize + bfloat16 path's max |error| against float32 is
# 0.56% (DeepSeek-V3, K up to 7168) and 0.63% (Mixtral, K up to 14336) of max |output| (each record's `noise`
# is the same measure on the device). 1e-2 is about twice that: a GEMM that only accumulates in another
# order, or rounds its output once more, is equal; one that changes the numbers by more than bfloat16 does is
# not. Quantizing the activations to e4m3 (`recipe_error`, the recipe emulated exactly in float32) is
# ~4.4% on these shapes, so by this rule the recipe itself is not equal, whatever the kernel.
TOLERANCE = 1e-2

Best = Callable[[Callable[[], object]], float]


def run(opts: CheckOptions, name: str) -> Outcome:
    dtype = torch.float32 if opts.dry_run else torch.bfloat16
    device = torch.device(opts.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 references (noise, emulation) must be float32
    best = timer(opts.device)
    copy_gbps = _copy_gbps(device, best, 2**24 if opts.dry_run else 2**30)
    gate = _gate(opts.device)
    # cpu: probing is harmless (torch raises) and takes the dry run through it; an older GPU is not probed
    probing = hasattr(torch, "_scaled_mm") and (gate is None or opts.device == "cpu")
    mm, probe = scaled_mm.probe(opts.device, dtype) if probing else (None, {})
    use = mm if gate is None else None  # measured only where the gate lets it
    shapes = {shape: _shape(H, I, device, dtype, best, use, copy_gbps)
              for shape, (H, I) in (DRY_SHAPES if opts.dry_run else SHAPES).items()}
    verdict = _verdict(gate, mm, probe, shapes)
    numbers = {"what": f"{opts.device}, {'device-event' if opts.device == 'cuda' else 'wall-clock'} timed, best of "
                       f"{REPEATS}" + (" (dry run: toy shapes)" if opts.dry_run else ""),
               "dtype": str(dtype).removeprefix("torch."), "copy_gbps": copy_gbps, "tokens": list(TOKENS),
               "tolerance": TOLERANCE, "probe": probe, "block_scaled_gemm": verdict, "shapes": shapes}
    numbers["headline"] = _headline(shapes, copy_gbps, verdict)
    return Outcome(numbers)


def timer(device: str) -> Best:
    """best(fn): the seconds of fn's best run of REPEATS, after one warm-up (cuBLAS picks its kernels, the
    allocator its blocks). cuda: device events around what fn queues on the current stream."""

    def once(fn: Callable[[], object]) -> float:
        if device != "cuda":
            began = time.perf_counter()
            fn()
            return time.perf_counter() - began
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()  # nothing queued before: the span is fn's own work and launch gaps
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def best(fn: Callable[[], object]) -> float:
        once(fn)
        return min(once(fn) for _ in range(REPEATS))

    return best


def _copy_gbps(device: torch.device, best: Best, n: int) -> float:
    """GB/s of one n-byte device-to-device copy, bytes read + written: the bound dequantization streams against."""
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / best(lambda: dst.copy_(src)) / 1e9


def _gate(device: str) -> str | None:
    """Why this device can't run a block-scaled FP8 GEMM; None where it may (the probe says whether torch can)."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if device != "cuda":
        return f"--device {device}: a block-scaled FP8 GEMM needs a cuda device of compute capability >= 9.0"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return f"{torch.cuda.get_device_name()} is compute capability {major}.{minor}; the GEMM needs >= 9.0"
    return None


def _shape(H: int, I: int, device: torch.device, dtype: torch.dtype, best: Best, mm: scaled_mm.Mm | None,
           copy_gbps: float) -> dict:
    """One expert of hidden H and width I: its dequantization, then a launch at each T of TOKENS."""
    gen = torch.Generator(device=device).manual_seed(0)
    quantized = MLPWeights(*(fp8.quantize(torch.randn(o, i, device=device, generator=gen) * WEIGHT_STD)
                             for o, i in ((I, H), (I, H), (H, I))))  # gate_proj, up_proj [I, H]; down_proj [H, I]
    work = fp8.work_views(quantized, torch.empty(fp8.work_numel(quantized), dtype=dtype, device=device))
    dequant_s = best(lambda: fp8.dequantize_into(quantized, work))
    moved = sum(getattr(quantized, f.name).nbytes for f in fields(quantized)) + (
        fp8.work_numel(quantized) * work.gate_proj.element_size())  # FP8 + scales read, run dtype written
    rows = [_launches(T, quantized, work, dequant_s, device, dtype, best, mm, gen) for T in TOKENS]
    x = torch.randn(HEADLINE_T, H, dtype=dtype, device=device, generator=gen)
    noise = relative_error(mlp(work, x), mlp(fp8.plain(quantized, torch.float32), x.float()))
    gbps = moved / dequant_s / 1e9
    return {"hidden": H, "width": I, "dequant_s": dequant_s, "dequant_bytes": moved, "dequant_gbps": gbps,
            "of_copy": gbps / copy_gbps, "noise": noise, "rows": rows}


def _launches(T: int, quantized: MLPWeights, work: MLPWeights, dequant_s: float, device: torch.device,
              dtype: torch.dtype, best: Best, mm: scaled_mm.Mm | None, gen: torch.Generator) -> dict:
    """At T tokens: the streamed launch (dequantize, then the SwiGLU), the SwiGLU alone, and the FP8 GEMM's."""
    H, I = work.down_proj.shape
    x = torch.randn(T, H, dtype=dtype, device=device, generator=gen)  # [T, H]
    h = torch.randn(T, I, dtype=dtype, device=device, generator=gen)  # [T, I]: stands for silu(gate x) * up x
    launch_s = best(lambda: (fp8.dequantize_into(quantized, work), mlp(work, x)))
    swiglu_s = best(lambda: mlp(work, x))
    y = mlp(work, x)  # [T, H]: what moegen computes now, the FP8 GEMM's reference
    row = {"tokens": T, "launch_s": launch_s, "swiglu_s": swiglu_s, "dequant_share": dequant_s / launch_s,
           "swiglu_tflops": 2 * T * mlp_params(work) / swiglu_s / 1e12,
           "act_quant_s": best(lambda: (quantize_rows(x), quantize_rows(h))),  # in fp8_gemm_s: eager torch ops
           "recipe_error": relative_error(scaled_mm.swiglu(quantized, x, scaled_mm.emulated), y),
           "fp8_gemm_s": None, "fp8_error": None, "fp8_speedup": None, "fp8_failed": None}
    if mm is not None:
        try:  # a constraint the small probe didn't meet (a shape, memory) is recorded, not raised
            row["fp8_gemm_s"] = best(lambda: scaled_mm.swiglu(quantized, x, mm))
            row["fp8_error"] = relative_error(scaled_mm.swiglu(quantized, x, mm), y)
            row["fp8_speedup"] = launch_s / row["fp8_gemm_s"]
        except Exception as exc:
            row["fp8_failed"] = f"{type(exc).__name__}: {exc}"
    return row


def _verdict(gate: str | None, mm: scaled_mm.Mm | None, probe: dict[str, str], shapes: dict) -> str:
    """What the measurements say a switch to the block-scaled GEMM would be."""
    if gate is not None:
        return f"unsupported: {gate}"
    if mm is None:
        return "unsupported: " + "; ".join(f"{form}: {said.splitlines()[0]}" for form, said in probe.items())
    rows = [(shape, r) for shape, s in shapes.items() for r in s["rows"]]
    failed = [f"{shape} T={r['tokens']}: {r['fp8_failed'].splitlines()[0]}" for shape, r in rows if r["fp8_failed"]]
    if failed:
        return "unsupported: " + "; ".join(failed)
    if any(r["fp8_error"] > TOLERANCE for _, r in rows):
        return "not equal"
    return "faster and equal" if all(r["fp8_speedup"] > 1 for _, r in rows) else "slower"


def _headline(shapes: dict, copy_gbps: float, verdict: str) -> str:
    parts = []
    for shape, s in shapes.items():
        at = next(r for r in s["rows"] if r["tokens"] == HEADLINE_T)
        gemm = f", FP8 GEMM {at['fp8_speedup']:.2f}x" if at["fp8_speedup"] else ""
        share = 100 * at["dequant_share"]
        parts.append(f"{shape} {s['dequant_gbps']:.0f}, {100 * s['of_copy']:.0f}%, {share:.0f}%{gemm}")
    errors = [r["fp8_error"] for s in shapes.values() for r in s["rows"] if r["fp8_error"] is not None]
    detail = f" (max err {max(errors):.1e}, tolerance {TOLERANCE:.0e})" if errors else ""
    return (f"dequant GB/s, of copy's {copy_gbps:.0f}, of a T={HEADLINE_T} launch: {'; '.join(parts)}; "
            f"block-scaled GEMM: {verdict}{detail}")
