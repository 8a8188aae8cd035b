"""Stage 3, parity: the runtime's greedy tokens on the device against the CPU reference's.

For each prepared family (tools/gpu_check/prepare.py) and each knob set of KNOBS:
(a) float32 with TF32 off: every token must equal the reference's;
(b) bfloat16: a prompt is within the rule if it diverges from the float32 reference only where the
    reference's gap at its first divergence is below the family's bfloat16 tolerance (prepare.py says
    how it is set). Runs beyond it are reported (`bf16_beyond`), not failed: on these tiny random MoE
    checkpoints bfloat16 rounding flips expert choices, and where it does differs between runs of the
    same code (the cpu lanes' adds commute only up to rounding), so no tolerance both holds and means
    something. Failing runs: float32 tokens that differ, a sync under the debug mode, an error.
On cuda each decode runs under `torch.cuda.set_sync_debug_mode("error")`, set right before
iterating `engine.generate(...)` and reset before the engine closes: a host-device sync on the hot
path fails the stage with its message. A run that raised a sync error is run once more without the
mode, so its tokens are still checked (cpu: no sync mode).

Record: `rows` (one per family, dtype and knob set: `equal`/`of` prompts identical,
`divergences` [{prompt, position, ours, oracle, gap}], `tolerance`, `accepted`, `sync_error`,
`error` (the run raised: its other fields are missing), `seconds`, `h2d_weight_bytes`,
`device_high_water`, `budget`), `failures` (one line each), `bf16_beyond` (one line each), `tf32`.
"""

from __future__ import annotations

import time
import traceback

import torch

from tools.gpu_check.options import CheckOptions
from tools.gpu_check.prepare import NEW_TOKENS, PROMPTS, Expected, divergences, expected, manifest
from tools.gpu_check.stages import Outcome, Skip

KNOBS = {
    "defaults": {},
    "1 expert slot": {"expert_slots": 1},
    "offload budget": {"gpu_memory": "auto"},  # a quarter of the modules' bytes: most stream every step
    "model batching": {"batching": "model", "expert_slots": 2},
}
SYNC_ERROR = "synchronizing CUDA operation"  # what torch's sync debug mode raises with


def run(opts: CheckOptions, name: str) -> Outcome:
    found = manifest(opts.prepared)
    if found is None:
        raise Skip(f"no prepared parity data in {opts.prepared}: run `bash tools/gpu_check.sh --prepare` on the "
                   "CPU before the session and carry .gpu_check")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for family in found["families"]:
        want = expected(opts.prepared, family)
        for dtype in ("float32", "bfloat16"):
            rows += _runs(opts, family, want, dtype)
    failures = [f"{r['family']} {r['dtype']} {r['knobs']}: {why}" for r in rows for why in _why(r, fail=True)]
    beyond = [f"{r['family']} {r['knobs']}: {why}" for r in rows if r["dtype"] == "bfloat16"
              for why in _why(r, fail=False)]
    equal = sum(r.get("equal", 0) for r in rows)
    total = len(PROMPTS) * len(rows)
    syncs = sum(r.get("sync_error") is not None for r in rows)
    numbers = {"rows": rows, "failures": failures, "bf16_beyond": beyond,
               "tf32": torch.backends.cuda.matmul.allow_tf32,
               "headline": f"{equal}/{total} prompts token-identical over {len(rows)} runs; "
                           f"{len(failures)} failures" + (f" ({syncs} runs hit a sync)" if syncs else "")
                           + f"; {len(beyond)} bfloat16 runs beyond the tolerance (reported)"}
    return Outcome(numbers, "; ".join(failures[:6]) + (" …" if len(failures) > 6 else "") if failures else None)


def _runs(opts: CheckOptions, family: str, want: Expected, dtype: str) -> list[dict]:
    """A row per knob set; a run that raises is its row's `error`, and the others still run."""
    from moegen.models.loader import load_checkpoint

    rows, module_bytes = [], None
    for knob_name, knobs in KNOBS.items():
        row = {"family": family, "dtype": dtype, "knobs": knob_name, "error": None}
        knobs = dict(knobs)
        if knobs.get("gpu_memory") == "auto":
            if module_bytes is None:
                rows.append(row | {"error": "no defaults run to size the offload budget from", "seconds": 0.0})
                continue
            knobs["gpu_memory"] = module_bytes
        # loaded afresh for each engine: an engine packs the weights it is given (in its dtype, and on
        # the cpu reordered for oneDNN), and the next would start from that
        cfg, weights, _ = load_checkpoint(opts.prepared / "parity" / family)
        started = time.perf_counter()
        try:
            checked, high_water, blocks = _check(opts, cfg, weights, want, dtype, knobs)
        except Exception as exc:
            traceback.print_exc()
            rows.append(row | {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - started})
            continue
        if module_bytes is None:  # room for the core, staging and a quarter of the modules
            module_bytes = high_water - 3 * blocks // 4
        rows.append(row | checked)
    return rows


def _check(opts: CheckOptions, cfg, weights, want: Expected, dtype: str, knobs: dict) -> tuple[dict, int, int]:
    """One engine run, checked; (its row, its device high water, its modules' host bytes)."""
    from moegen.runtime.config import RuntimeConfig

    rcfg = RuntimeConfig(device=opts.device, dtype=dtype, max_seq_len=64, batch_size=3, **knobs)
    started = time.perf_counter()
    sync_error = None
    try:
        got, stats = _generate(cfg, weights, rcfg, want.eos, sync_debug=opts.device == "cuda")
    except RuntimeError as exc:
        if SYNC_ERROR not in str(exc):
            raise
        sync_error = str(exc).splitlines()[0]
        got, stats = _generate(cfg, weights, rcfg, want.eos, sync_debug=False)
    found = divergences(got, want.tokens, want.logits)
    tolerance = 0.0 if dtype == "float32" else want.bf16_tolerance
    row = {"equal": len(got) - len(found), "of": len(got), "divergences": found, "tolerance": tolerance,
           "accepted": all(d["gap"] is not None and d["gap"] < tolerance for d in found), "sync_error": sync_error,
           "seconds": time.perf_counter() - started} | stats
    return row, stats["device_high_water"], stats["module_bytes"]


def _generate(cfg, weights, rcfg, eos: tuple[int, ...], sync_debug: bool) -> tuple[list[list[int]], dict]:
    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request

    with Engine(cfg, weights, rcfg, eos) as engine:
        requests = [Request(p, NEW_TOKENS) for p in PROMPTS]
        if sync_debug:
            torch.cuda.set_sync_debug_mode("error")
        try:
            got = {r.id: r.token_ids for r in engine.generate(requests)}
        finally:
            if sync_debug:  # before close(): closing synchronizes on purpose
                torch.cuda.set_sync_debug_mode(0)
        c = engine.backend.counters
        stats = {"h2d_weight_bytes": c.h2d_weight_bytes, "device_high_water": c.device_high_water,
                 "budget": engine.backend.budget,
                 "module_bytes": sum(b.nbytes for b in engine.runtime.placement.blocks.values())}
    return [got[i] for i in range(len(PROMPTS))], stats


def _why(row: dict, fail: bool) -> list[str]:
    """What fails the row (`fail`), or what is only reported of it: a bfloat16 divergence beyond the rule."""
    if not fail:
        return [] if row["error"] is not None or row["accepted"] else _divergence(row)
    if row["error"] is not None:
        return [row["error"]]
    out = []
    if row["sync_error"] is not None:
        out.append(f"sync under set_sync_debug_mode('error'): {row['sync_error']}")
    if row["dtype"] == "float32" and not row["accepted"]:
        out += _divergence(row)
    return out


def _divergence(row: dict) -> list[str]:
    """The row's divergences in one line, the worst named."""
    worst = max(row["divergences"], key=lambda d: float("inf") if d["gap"] is None else d["gap"])
    gap = "a different length" if worst["gap"] is None else f"gap {worst['gap']:.4f}"
    return [f"{len(row['divergences'])}/{row['of']} prompts diverged, prompt {worst['prompt']} at token "
            f"{worst['position']} with {gap} (tolerance {row['tolerance']:.4f})"]
