"""`moegen bench`: the scenarios in order, the JSON saved after each, the tables returned last."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moegen.bench import (fp8_quality, host_attention, llamacpp, offload, paged_kv, planner, report, vs_llamacpp,
                          vs_transformers)
from moegen.bench.machine import machine, matmul_peak
from moegen.checkpoints.demo import cache_dir, cached_checkpoint
from moegen.io import json_bytes


@dataclass(frozen=True, slots=True)
class BenchOptions:
    scenario: str  # all (vs-transformers and offload), vs-transformers, offload, planner, fp8-quality, paged-kv or
    # host-attention
    device: str  # vs-transformers: what both engines run on, cpu or cuda (offload, planner: the cpu backend)
    models: list[Path]  # vs-transformers and fp8-quality checkpoints; empty: the bench Mixtral- and
    # DeepSeek-V2-Lite-like ones
    prompts: int  # vs-transformers: prompts of 32-128 tokens
    new_tokens: int  # vs-transformers: generated per prompt
    hf_batches: tuple[int, ...]  # transformers batch sizes
    offload_batch: int  # sequences in flight, module-based (model-based: what fits, at most this)
    offload_seq_len: int  # tokens of KV each sequence reserves
    offload_prompt_len: int
    offload_expert_slots: int | None  # None: what fits
    offload_new_tokens: int
    offload_hide_tokens: int  # the simulated link: one expert's copy takes its compute over this many tokens
    json_path: Path | None  # every raw number, rewritten after each scenario
    keep_trace: Path | None  # the offload module run's trace
    paged_kv: paged_kv.PagedKVOptions = paged_kv.PagedKVOptions()  # the paged-kv scenario's sizes
    llamacpp_prompt_len: int = 64  # vs-llamacpp: tokens per prompt (BOS included)
    llamacpp_rounds: int = 2  # vs-llamacpp: rounds of every engine, alternated
    llamacpp_dtype: str = "float32"  # vs-llamacpp: both engines' dtype (moegen --dtype, the GGUF's type)


def run_bench(o: BenchOptions, say: Callable[[str], None]) -> list[str]:
    """Run the chosen scenarios; returns the tables' lines."""
    out = {"machine": machine(), "device": o.device, "matmul_peak_flop_s": matmul_peak(o.device), "scenarios": {}}
    on = out["machine"]["gpu"] if o.device == "cuda" else f"{out['machine']['cpu']} ({out['machine']['cores']} cores)"
    say(f"moegen bench on {on}; float32 matmul peak {out['matmul_peak_flop_s'] / 1e9:.0f} GFLOP/s")

    def save() -> None:  # after each scenario, so a later failure loses nothing measured
        if o.json_path is not None:
            o.json_path.write_bytes(json_bytes.dumps(out, indent=True))

    tables: list[str] = []
    bench_models = o.models or [cached_checkpoint(f, "bench", "bench") for f in ("mixtral", "deepseek_v2")]
    if o.scenario in ("all", "vs-transformers"):
        for model_dir in bench_models:
            say(f"vs transformers: {model_dir}")
            result = vs_transformers.scenario(model_dir, o.prompts, o.new_tokens, o.hf_batches,
                                              out["matmul_peak_flop_s"], say, o.device)
            out["scenarios"].setdefault("vs_transformers", []).append(result)
            save()
            lines = report.vs_transformers_table(result)
            say("\n".join(lines))
            tables += lines
    if o.scenario == "vs-llamacpp":
        for model_dir in bench_models:
            say(f"vs llama.cpp: {model_dir}")
            try:
                result = vs_llamacpp.scenario(model_dir, o.prompts, o.llamacpp_prompt_len, o.new_tokens,
                                              o.llamacpp_rounds, cache_dir(), say, o.llamacpp_dtype)
            except llamacpp.Unavailable as exc:  # no row is better than a made-up one
                say(f"vs llama.cpp: not run: {exc}")
                out["scenarios"]["vs_llamacpp_unavailable"] = str(exc)
                save()
                break
            out["scenarios"].setdefault("vs_llamacpp", []).append(result)
            save()
            lines = report.vs_llamacpp_table(result)
            say("\n".join(lines))
            tables += lines
    if o.scenario in ("all", "offload"):
        model_dir = cached_checkpoint("mixtral", "bench", "bench")
        say(f"offload regime: {model_dir}")
        result = offload.scenario(model_dir, o.offload_batch, o.offload_prompt_len, o.offload_new_tokens,
                                  o.offload_seq_len, say=say, keep_trace=o.keep_trace,
                                  expert_slots=o.offload_expert_slots, hide_tokens=o.offload_hide_tokens)
        out["scenarios"]["offload"] = result
        save()
        tables += report.offload_table(result)
    if o.scenario == "fp8-quality":
        for model_dir in bench_models:
            say(f"fp8 quality: {model_dir}")
            result = fp8_quality.scenario(model_dir, o.prompts, o.new_tokens, say)
            out["scenarios"].setdefault("fp8_quality", []).append(result)
            save()
            tables += report.fp8_quality_table(result)
    if o.scenario == "paged-kv":
        model_dir = o.models[0] if o.models else cached_checkpoint("mixtral", "small", "bench")
        result = paged_kv.scenario(model_dir, o.paged_kv, say)
        out["scenarios"]["paged_kv"] = result
        save()
        tables += report.paged_kv_table(result)
    if o.scenario == "host-attention":
        model_dir = o.models[0] if o.models else cached_checkpoint("mixtral", "small", "bench")
        result = host_attention.scenario(model_dir, host_attention.HostAttentionOptions(), say)
        out["scenarios"]["host_attention"] = result
        save()
        tables += report.host_attention_table(result)
    if o.scenario == "planner":
        results = planner.scenario(say)
        out["scenarios"]["planner"] = results
        save()
        tables += report.planner_table(results)
    return tables
