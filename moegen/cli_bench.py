"""`moegen bench`: its options (the scenarios and their sizes); what runs is moegen.bench.run."""

from __future__ import annotations

from pathlib import Path

import click

from moegen.cli_knobs import need_perfetto, say


@click.command("bench")
@click.option("--scenario", type=click.Choice(["all", "vs-transformers", "offload", "planner", "fp8-quality",
                                                        "paged-kv", "host-attention", "vs-llamacpp"]),
              default="all", show_default=True,
              help="all = vs-transformers and offload; planner (alone): the planner's predictions and choices against "
                   "measured runs and a grid of hand-set knobs; fp8-quality (alone): greedy completions with "
                   "--weight-dtype fp8 and fp8-all against the weights as loaded; paged-kv (alone): the paged host KV cache "
                   "against today's row reservation under one --host-kv-memory (a long-tailed job, offload regime) "
                   "and with/without prefix sharing (a shared-prefix job); host-attention (alone): --cpu-attention 0 "
                   "against the planned share at long contexts (offload regime), predicted against measured; "
                   "vs-llamacpp (alone): serve-offline against llama.cpp on the cpu (built once into the cache from "
                   "the llama-cpp-python sdist; needs cmake and a C++ compiler), alternated over rounds.")
@click.option("--model", "models", multiple=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Checkpoint(s) for vs-transformers and fp8-quality (repeatable), paged-kv and host-attention (the "
                   "first) [default: the bench Mixtral-like and DeepSeek-V2-Lite-like checkpoints; paged-kv and "
                   "host-attention: the small Mixtral-like one; made once in the cache].")
@click.option("--prompts", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--hf-batch", "hf_batches", type=click.IntRange(min=1), multiple=True, default=(32, 128),
              show_default=True, help="transformers batch sizes (repeatable).")
@click.option("--offload-batch", type=click.IntRange(min=1), default=3072, show_default=True,
              help="offload: sequences in flight (module-based; model-based takes what fits, at most this).")
@click.option("--offload-seq-len", type=click.IntRange(min=2), default=64, show_default=True,
              help="offload: the longest sequence each mode reserves KV for.")
@click.option("--offload-prompt-len", type=click.IntRange(min=1), default=2, show_default=True,
              help="offload: prompt tokens; the whole batch's prompts are admitted in one step, whose activations "
                   "must fit the budget beside two expert slots.")
@click.option("--offload-expert-slots", type=click.IntRange(min=1), default=None,
              help="offload: expert slots for both modes [default: what fits; placement may keep some experts "
                   "resident instead].")
@click.option("--offload-new-tokens", type=click.IntRange(min=2), default=12, show_default=True,
              help="offload: enough that every admitted sequence is still decoding once the last prompt is in.")
@click.option("--offload-hide-tokens", type=click.IntRange(min=1), default=2000, show_default=True,
              help="offload: the simulated link's speed, as the tokens whose expert compute one expert's copy takes "
                   "(2000: a 24 GB PCIe-4 card's ratio; larger: a slower link, more link-bound).")
@click.option("--paged-requests", type=click.IntRange(min=1), default=256, show_default=True,
              help="paged-kv: rows of the long-tailed job (caps up to 512 new tokens, mean ~48).")
@click.option("--paged-rows", type=click.IntRange(min=1), default=16, show_default=True,
              help="paged-kv: rows of max_seq_len the one --host-kv-memory holds (today's row reservation's B); the "
                   "paged run may keep 8x as many in flight.")
@click.option("--paged-questions", type=click.IntRange(min=2), default=1000, show_default=True,
              help="paged-kv: questions after the one 512-token prefix of the shared-prefix job.")
@click.option("--llamacpp-prompt-len", type=click.IntRange(min=2), default=64, show_default=True,
              help="vs-llamacpp: tokens per prompt, BOS included (--prompts of them, --new-tokens each).")
@click.option("--llamacpp-rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="vs-llamacpp: rounds of moegen, llama-batched-bench and llama-server, alternated.")
@click.option("--llamacpp-dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="vs-llamacpp: both engines' dtype: moegen serve-offline --dtype, and the GGUF llama.cpp runs "
                   "(F32 or BF16).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every raw number here.")
@click.option("--keep-trace", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="offload: keep the module-based run's trace here.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="vs-transformers: what both engines run on (auto: cuda where torch sees a GPU, else cpu). "
                   "offload and planner run on the cpu backend: their link is simulated.")
def bench_cmd(scenario, models, prompts, new_tokens, hf_batches, offload_batch, offload_seq_len, offload_prompt_len,
              offload_expert_slots, offload_new_tokens, offload_hide_tokens, paged_requests, paged_rows, paged_questions,
              llamacpp_prompt_len, llamacpp_rounds, llamacpp_dtype, json_path, keep_trace, device):
    """Throughput side by side in one run: moegen vs transformers, module vs model batching."""
    from moegen.bench.paged_kv import PagedKVOptions
    from moegen.bench.run import BenchOptions, run_bench
    from moegen.runtime.auto import resolve_device

    if scenario in ("all", "offload", "planner", "paged-kv", "host-attention"):  # these measure from their runs' traces
        need_perfetto(f"moegen bench --scenario {scenario}")
    options = BenchOptions(scenario, resolve_device(device, say=say), [Path(m) for m in models], prompts, new_tokens,
                           tuple(hf_batches), offload_batch, offload_seq_len, offload_prompt_len, offload_expert_slots,
                           offload_new_tokens, offload_hide_tokens, json_path, keep_trace,
                           PagedKVOptions(requests=paged_requests, rows=paged_rows, questions=paged_questions),
                           llamacpp_prompt_len, llamacpp_rounds, llamacpp_dtype)
    click.echo("\n".join(run_bench(options, say=lambda text: click.echo(text, err=True))))
