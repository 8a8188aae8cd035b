"""The offload regime on the cpu backend: module-based against model-based batching, same device
budget, same simulated link, same prefetcher and kernels.

The budget is a third of the model's bytes (`budget_share`). The link is chosen so that hiding one expert's copy
behind its compute takes about `hide_tokens` tokens, the ratio of a 24 GB PCIe-4 card:
`link = expert-GEMM FLOP/s (measured here, large token counts) × bytes per weight / (2 × hide_tokens)`.
The job: sequences of `prompt_len`-token prompts that may each grow to `seq_len` tokens, which is
the KV each mode reserves per sequence (and so what bounds model-based batching's batch on the
device). Only the first `new_tokens` of each are generated: what is measured is the decode steps
at full batch (from each run's trace: tokens/s and the weights link's busy fraction), whose cost
does not depend on their position at these lengths; running the job to its end would take this
CPU many minutes per mode. Module-based admits the whole batch's prompts in one step, so its
activations are sized for that step; which experts stay resident and how many slots stream the
rest is left to the planner, as `serve-offline` leaves it (model-based keeps the baselines' policy:
the least weight placement, the rest of the budget to its KV).

The FP8 row (`fp8_rows`): module-based batching on the same checkpoint as loaded (float32 on the cpu) and with
every linear but the routers and lm_head quantized to FP8 at load (`--weight-dtype fp8-all`), every expert
streamed (`--resident-experts 0`), the same link, each under a budget that holds what a run reserves beside
the streamable modules (lm_head, norms, routers, KV staging, activations: the same for both) plus the same
share of its own module bytes: the bytes each step moves fall about 4x (1 byte a weight and 4 a 128x128
block against 4), which is what the decode rate can gain where the link binds.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from moegen.bench.flops import model_work
from moegen.bench.machine import gemm_flops
from moegen.models.hf_config import load_model_config
from moegen.trace.slices import Slice
from moegen.trace.summarize import parse


def link_for(model_dir: Path, hide_tokens: int) -> tuple[float, float]:
    """(link GB/s, measured expert-GEMM FLOP/s): the bandwidth at which one expert's copy takes as long
    as its compute over `hide_tokens` tokens (float32 weights: 4 bytes each)."""
    cfg = load_model_config(model_dir)
    flop_s = gemm_flops(2048, cfg.hidden_size, cfg.moe.expert_intermediate)
    return flop_s * 4 / (2 * hide_tokens) / 1e9, flop_s


def decode_numbers(trace: Path) -> dict:
    """From a run's trace: tokens/s of the decode steps at full batch (every sequence in flight decodes;
    not the steps where prompts are still being admitted or the last sequences are finishing) and the
    weights link's busy fraction during them."""
    parsed = parse(trace)
    steps = [s for s in parsed.slices if s.track == "event loop" and s.args.get("phase") == "decode"]
    full = max((int(s.args.get("sequences", 0)) for s in steps), default=0)
    steps = [s for s in steps if int(s.args.get("sequences", 0)) == full]
    copies = [s for s in parsed.slices if s.track == "copy H2D weights stream" and s.depth == 0]
    decode_ns = sum(s.end - s.start for s in steps)
    tokens = sum(int(s.args.get("sequences", 0)) for s in steps)
    busy = sum(_overlap(c, s) for s in steps for c in copies)
    return {"decode_steps": len(steps), "decode_tokens": tokens, "decode_s": decode_ns / 1e9,
            "decode_tok_s": tokens / (decode_ns / 1e9) if decode_ns else 0.0,
            "link_busy": busy / decode_ns if decode_ns else 0.0}


def _overlap(a: Slice, b: Slice) -> int:
    return max(0, min(a.end, b.end) - max(a.start, b.start))


def run_mode(model_dir: Path, mode: str, batch: int, budget: int, link_gbps: float, prompts: list[list[int]],
             new_tokens: int, seq_len: int, workdir: Path, expert_slots: int | None = None,
             resident_experts: int | None = None, weight_dtype: str = "auto", module_share: float | None = None) -> dict:
    """One mode's run: its batch (model-based: what fits the budget, at most `batch`), one batch of
    requests, and the decode numbers from its trace. With `module_share`, the budget is what the run reserves
    beside the streamable modules plus that share of the modules' own bytes (FP8 ones as stored; at least the
    smallest slot pools), in place of `budget`."""
    from moegen.models.hf_config import generation_eos_ids
    from moegen.models.loader import load_checkpoint
    from moegen.planner.cost import Workload
    from moegen.planner.plan import plan_run
    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request

    # Activations for one step that admits the whole batch (every prompt at once, then decode at full
    # batch) and KV staging for 64 sequences: the rest of the budget goes to expert slots (model-based:
    # to its KV).
    prompt_len = max(map(len, prompts))
    set_here = ({"batch_size", "attn_micro_batch", "max_step_tokens"} | ({"expert_slots"} if expert_slots else set())
                | ({"resident_experts"} if resident_experts is not None else set()))
    rcfg = RuntimeConfig(device="cpu", batch_size=batch, gpu_memory=budget, sim_link_gbps=link_gbps,
                         max_seq_len=seq_len, batching=mode, max_step_tokens=batch * prompt_len + seq_len,
                         attn_micro_batch=64, expert_slots=expert_slots, resident_experts=resident_experts,
                         weight_dtype=weight_dtype)
    cfg, weights, _ = load_checkpoint(model_dir, weight_dtype=weight_dtype)
    if module_share is not None:
        budget = _beside_modules(cfg, weights, rcfg) + _module_budget(weights, module_share)
        rcfg = dataclasses.replace(rcfg, gpu_memory=budget)
    if mode == "module":  # as serve-offline runs it: the knobs set here stay, the planner chooses the rest
        rcfg = plan_run(cfg, weights, rcfg, frozenset(set_here), Workload(batch, prompt_len, new_tokens, seq_len)).rcfg
    trace = workdir / f"{mode}.pftrace"
    with Engine(cfg, weights, rcfg, generation_eos_ids(model_dir, cfg), trace=trace) as engine:
        B = engine.runtime.batch_size
        requests = [Request(prompts[i % len(prompts)], new_tokens, ignore_eos=True) for i in range(B)]
        for _ in engine.generate(requests):
            pass
        counters, placement = engine.backend.counters, engine.runtime.placement
        streamed = sum(b.nbytes for m, b in placement.blocks.items() if placement.streamed(m))
        slots = {kind: pool.count for kind, pool in placement.pools.items()}
        steps = engine.stats.steps
    numbers = decode_numbers(trace)
    numbers |= {"mode": mode, "weight_dtype": weight_dtype, "budget_bytes": budget, "batch": B,
                "expert_slots": slots.get("expert", 0), "streamed_bytes": streamed,
                "weight_host_bytes": sum(b.nbytes for b in placement.blocks.values()),
                "resident_experts": sum(m.kind == "expert" for m in placement.resident_modules),
                "knobs": {k: getattr(rcfg, k) for k in ("expert_slots", "resident_experts", "attn_micro_batch")},
                "h2d_weight_bytes_per_step": counters.h2d_weight_bytes / max(steps, 1),
                "link_bound_tok_s": B * link_gbps * 1e9 / streamed if streamed else float("inf")}
    return numbers


def _module_budget(weights, share: float) -> int:
    """`share` of the streamable modules' host bytes (FP8 linears as stored, the rest in float32), and at least
    two slots of each kind (with a slot left over: the planner may give more to experts)."""
    import torch

    from moegen.runtime.residency import module_sizes, slot_bytes

    sizes = module_sizes(weights, torch.float32)
    slots = slot_bytes(sizes)
    return max(int(share * sum(s.host for s in sizes.values())), 2 * sum(slots.values()) + slots["expert"])


def _beside_modules(cfg, weights, rcfg) -> int:
    """Device bytes a run of `rcfg` reserves beside the streamable modules (the runtime's own sizing rules)."""
    import torch

    from moegen.planner.cost import ModelFacts, setting

    unbounded = setting(ModelFacts.of(cfg, weights, torch.float32), rcfg, None, 2**62)
    return unbounded.device_bytes - unbounded.residency.device_bytes


def fp8_rows(model_dir: Path, batch: int, budget_share: float, link_gbps: float, prompts: list[list[int]],
             new_tokens: int, seq_len: int, workdir: Path, say=print) -> dict:
    """Module-based batching on the checkpoint as loaded and quantized to FP8 at load, every expert streamed,
    each with a budget that holds what a run reserves beside the modules plus `budget_share` of its own module
    bytes, the same link; returns both runs and their ratios."""
    runs = {}
    for weight_dtype in ("auto", "fp8-all"):
        say(f"  module-based, --weight-dtype {weight_dtype}, --resident-experts 0 ...")
        run = run_mode(model_dir, "module", batch, 2**62, link_gbps, prompts, new_tokens, seq_len, workdir,
                       resident_experts=0, weight_dtype=weight_dtype, module_share=budget_share)
        runs[weight_dtype] = run
        say(f"    budget {run['budget_bytes'] / 2**20:.0f} MiB, batch {run['batch']}: decode {run['decode_tok_s']:.1f} "
            f"tok/s, link busy {100 * run['link_busy']:.0f}%, host weights {run['weight_host_bytes'] / 2**20:.1f} MiB")
    plain, fp8 = runs["auto"], runs["fp8-all"]
    return {"runs": runs, "tok_s_ratio": fp8["decode_tok_s"] / plain["decode_tok_s"] if plain["decode_tok_s"] else None,
            "host_bytes_ratio": plain["weight_host_bytes"] / fp8["weight_host_bytes"],
            "step_bytes_ratio": plain["h2d_weight_bytes_per_step"] / fp8["h2d_weight_bytes_per_step"]
            if fp8["h2d_weight_bytes_per_step"] else None}


def scenario(model_dir: Path, batch: int, prompt_len: int, new_tokens: int, seq_len: int, hide_tokens: int = 2000,
             say=print, keep_trace: Path | None = None, expert_slots: int | None = None,
             budget_share: float = 1 / 3) -> dict:
    """Both modes, under a device budget of `budget_share` of the model's bytes; returns every number for
    the JSON."""
    from transformers import AutoTokenizer

    from moegen.bench.vs_transformers import bench_prompts

    work = model_work(model_dir)
    budget = int(work.weight_bytes * budget_share)
    link, expert_flop_s = link_for(model_dir, hide_tokens)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(t)["input_ids"][:prompt_len] for t in bench_prompts(tokenizer, 64)]
    say(f"  device budget {budget / 2**20:.0f} MiB ({budget_share:.2f} of {work.weight_bytes / 2**20:.0f} MiB of float32 "
        f"weights); simulated link {link:.3f} GB/s (expert GEMM {expert_flop_s / 1e9:.0f} GFLOP/s × 4 B / "
        f"(2 × {hide_tokens} tokens))")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="moegen-offload-") as tmp:
        for mode in ("module", "model"):
            say(f"  {mode}-based batching ...")
            runs[mode] = run_mode(model_dir, mode, batch, budget, link, prompts, new_tokens, seq_len, Path(tmp),
                                  expert_slots)
            say(f"    batch {runs[mode]['batch']}: decode {runs[mode]['decode_tok_s']:.1f} tok/s, "
                f"link busy {100 * runs[mode]['link_busy']:.0f}% of decode")
        fp8 = fp8_rows(model_dir, batch, budget_share, link, prompts, new_tokens, seq_len, Path(tmp), say)
        if keep_trace is not None:
            keep_trace.write_bytes((Path(tmp) / "module.pftrace").read_bytes())
    module, model = runs["module"], runs["model"]
    return {
        "model": str(model_dir), "budget_bytes": budget, "budget_share": budget_share, "link_gbps": link, "expert_gemm_flop_s": expert_flop_s,
        "hide_tokens": hide_tokens, "prompt_len": prompt_len, "new_tokens": new_tokens, "seq_len": seq_len,
        "expert_slots": expert_slots,
        "runs": runs, "ratio": module["decode_tok_s"] / model["decode_tok_s"] if model["decode_tok_s"] else None,
        "fp8": fp8,
    }
