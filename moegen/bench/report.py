"""The tables `moegen bench` prints last: every number beside its peer and its ceiling."""

from __future__ import annotations

from pathlib import Path

from moegen.bench import llamacpp


def vs_transformers_table(result: dict) -> list[str]:
    peak = result["matmul_peak_flop_s"]
    parity = result["parity"]
    lines = [f"{Path(result['model']).name}: {result['prompts']} prompts of {result['prompt_tokens'][0]}-"
             f"{result['prompt_tokens'][1]} tokens, {result['new_tokens']} new tokens each, greedy, EOS ignored",
             f"  {'engine':<36}{'seconds':>9}{'gen tok/s':>11}{'GFLOP/s':>9}{'% peak':>8}"]
    for run in result["runs"]:
        lines.append(f"  {run['engine']:<36}{run['seconds']:>9.1f}{run['tok_s']:>11.1f}{run['flop_s'] / 1e9:>9.1f}"
                     f"{100 * run['flop_s'] / peak:>7.0f}%")
    lines.append(f"  moegen / best transformers ({result['best_transformers']}): "
                 f"{result['ratio_to_best_transformers']:.2f}x; parity: {parity['identical']}/{parity['total']} "
                 f"identical, {parity['near_ties']} near-ties, {len(parity['failures'])} failures")
    lines += [f"    {failure}" for failure in parity["failures"][:5]]
    return lines


def vs_llamacpp_table(result: dict) -> list[str]:
    lines = [f"{Path(result['model']).name} vs llama.cpp ({result['llama_cpp']}, {result.get('dtype', 'float32')} / GGUF "
             f"{llamacpp.GGUF_TYPES[result.get('dtype', 'float32')].upper()}, {result['threads']} "
             f"threads): {result['prompts']} prompts of {result['prompt_tokens'][0]}-{result['prompt_tokens'][1]} "
             f"tokens, {result['new_tokens']} new each, greedy, EOS ignored, timed from process start",
             f"  {'round':<7}{'engine':<34}{'seconds':>9}{'gen tok/s':>11}"]
    for run in result["runs"]:
        lines.append(f"  {run['round'] + 1:<7}{run['engine']:<34}{run['seconds']:>9.1f}{run['tok_s']:>11.1f}")
    lines.append(f"  moegen / llama.cpp ({result['best_llama_cpp']}): best {result['ratio_best']:.2f}x, "
                 f"median {result['ratio_median']:.2f}x")
    return lines


def offload_table(result: dict) -> list[str]:
    lines = [f"{Path(result['model']).name}, offload regime (cpu backend, SIMULATED link "
             f"{result['link_gbps']:.3f} GB/s, device budget {result['budget_bytes'] / 2**20:.0f} MiB)",
             f"  {'batching':<10}{'batch':>7}{'expert slots':>14}{'resident':>10}{'decode tok/s':>14}{'link bound':>12}"
             f"{'link busy':>11}"]
    for mode, run in result["runs"].items():
        lines.append(f"  {mode:<10}{run['batch']:>7}{run['expert_slots']:>14}{run.get('resident_experts', 0):>10}"
                     f"{run['decode_tok_s']:>14.1f}{run['link_bound_tok_s']:>12.1f}{100 * run['link_busy']:>10.0f}%")
    if result["ratio"] is not None:
        lines.append(f"  module / model: {result['ratio']:.1f}x in decode tokens/s")
    if result.get("fp8"):
        lines += fp8_table(result["fp8"])
    return lines


def fp8_table(fp8: dict) -> list[str]:
    lines = ["  FP8 (module-based, every expert streamed; budget: what a run reserves beside the modules + the same "
             "share of each one's module bytes):",
             f"  {'weights':<10}{'host MiB':>10}{'MiB/step':>10}{'decode tok/s':>14}{'link bound':>12}{'link busy':>11}"]
    for name, run in fp8["runs"].items():
        lines.append(f"  {name:<10}{run['weight_host_bytes'] / 2**20:>10.1f}{run['h2d_weight_bytes_per_step'] / 2**20:>10.1f}"
                     f"{run['decode_tok_s']:>14.1f}{run['link_bound_tok_s']:>12.1f}{100 * run['link_busy']:>10.0f}%")
    if fp8["tok_s_ratio"] is not None:
        lines.append(f"  fp8 / as loaded: {fp8['tok_s_ratio']:.2f}x decode tok/s for {fp8['host_bytes_ratio']:.2f}x fewer "
                     f"host bytes and {fp8['step_bytes_ratio'] or 0:.2f}x fewer bytes moved per step")
    return lines


def fp8_quality_table(result: dict) -> list[str]:
    lines = [f"{Path(result['model']).name}: --weight-dtype against the weights as loaded (float32), {result['prompts']} "
             f"greedy completions of {result['new_tokens']} tokens",
             f"  {'weights':<10}{'MiB before':>11}{'MiB after':>10}{'identical':>11}{'mean |dlogit| at 1st diff':>27}"
             f"{'ref gap there':>15}"]
    for choice, c in result["choices"].items():
        lines.append(f"  {choice:<10}{c['bytes_before'] / 2**20:>11.1f}{c['bytes_after'] / 2**20:>10.1f}"
                     f"{c['identical']:>6}/{c['total']:<4}{c['mean_abs_dlogit_at_divergence']:>27.4f}"
                     f"{c['mean_ref_gap_at_divergence']:>15.4f}")
    lines.append(f"  (logits up to {result['choices'][next(iter(result['choices']))]['max_abs_logit']:.1f} in magnitude)")
    return lines


def planner_table(results: list[dict]) -> list[str]:
    """Per configuration: the plan's predicted and measured rates, and its job rate against the grid's best."""
    lines = ["", "planner, cpu backend (measured / predicted; plan's job tok/s / best of the measured grid):",
             f"  {'configuration':<36}{'decode bound':>14}{'decode':>16}{'prefill':>16}{'job':>16}{'vs grid best':>14}"]
    for r in results:
        plan = r["runs"][0]
        cells = [f"{plan['measured'][k]:.0f}/{plan['predicted'][k]:.0f}" for k in ("decode_tok_s", "prefill_tok_s",
                                                                                    "job_tok_s")]
        lines.append(f"  {r['config']['name']:<36}{r['bound']['decode']:>14}{cells[0]:>16}{cells[1]:>16}{cells[2]:>16}"
                     f"{r['plan_vs_grid_best']:>13.0%}")
    ratios = [run["ratio"][k] for r in results for run in r["runs"] for k in ("decode_tok_s", "prefill_tok_s",
                                                                                 "job_tok_s") if run["ratio"][k]]
    within = sum(0.75 <= x <= 1.25 for x in ratios)
    lines.append(f"  measured/predicted over every run and rate: {min(ratios):.2f}-{max(ratios):.2f}, "
                 f"{within} of {len(ratios)} within 25%")
    return lines


def paged_kv_table(result: dict) -> list[str]:
    """The long-tailed job's rows vs paged, then the shared-prefix job without vs with sharing."""
    t, p = result["long_tail"], result["shared_prefix"]
    lines = [f"{Path(result['model']).name}, long-tailed job, {_offload(t['link_gbps'], t['budget_bytes'])}: "
             f"{t['requests']} rows, caps "
             f"mean {t['caps_mean']:.1f} / max {t['caps_max']} of {t['max_new']}, host KV {t['host_kv_memory'] / 2**20:.1f} "
             f"MiB = {t['rows']} rows of {t['seq_len']} tokens",
             f"  {'mode':<7}{'batch':>6}{'in flight mean/max':>20}{'job s':>8}{'tok/s':>8}{'while waiting: in flight':>26}"
             f"{'tok/s':>8}{'preempt':>9}{'blocks':>8}{'peak held':>10}{'peak RSS GiB':>14}"]
    for name, r in t["runs"].items():
        a = r["admission_bound"]
        lines.append(f"  {name:<7}{r['batch_size']:>6}{r['sequences_mean']:>13.1f}/{r['sequences_max']:<6}"
                     f"{r['seconds']:>8.1f}{r['tok_s']:>8.1f}{a['sequences_mean']:>26.1f}{a['tok_s']:>8.1f}"
                     f"{r['preemptions']:>9}{r['blocks']:>8}{r['peak_blocks_held']:>10}{r['peak_rss_bytes'] / 2**30:>14.2f}")
    x = t["ratios"]
    lines.append(f"  paged / rows: in flight {x['sequences_mean']:.2f}x mean, {x['sequences_max']:.2f}x max; job tok/s "
                 f"{x['tok_s']:.2f}x; while prompts wait: in flight {x['admission_bound_sequences']:.2f}x, tok/s "
                 f"{x['admission_bound_tok_s']:.2f}x; expected ~ worst/mean length {t['worst_over_mean_tokens']:.2f}x "
                 f"({t['worst_over_mean_blocks']:.2f}x in blocks)")
    lines += [f"{Path(result['model']).name}, shared-prefix job, plain cpu: {p['questions']} questions of "
              f"{p['question_len']} tokens after one {p['prefix_len']}-token prefix, {p['new_tokens']} new tokens each",
              f"  {'mode':<12}{'job s':>8}{'prefill tokens':>16}{'prefix hits':>13}{'hit rate':>10}{'peak RSS GiB':>14}"]
    for name, r in p["runs"].items():
        lines.append(f"  {name:<12}{r['seconds']:>8.1f}{r['prefill_tokens']:>16}{r['prefix_hit_tokens']:>13}"
                     f"{100 * r['prefix_hit_rate']:>9.1f}%{r['peak_rss_bytes'] / 2**30:>14.2f}")
    y = p["ratios"]
    lines.append(f"  sharing: job {y['seconds']:.2f}x faster, {y['prefill_tokens']:.2f}x fewer prefill tokens")
    return lines


def host_attention_table(result: dict) -> list[str]:
    """Share 0 against the planned share: decode tok/s, bytes per decode step, predicted against measured."""
    o, k = result["options"], result["knobs"]
    lines = [f"{Path(result['model']).name}, host attention, {_offload(o['link_gbps'], result['budget_bytes'])}: "
             f"{o['requests']} requests "
             f"of {o['prompt_len']} + {o['new_tokens']} tokens; planned B={k['batch_size']}, attention "
             f"{k['attn_micro_batch']}, share {k['cpu_attention']}",
             f"  {'run':<9}{'share':>6}{'decode tok/s':>14}{'KV staged MB/step':>19}{'host MB/step':>14}"
             f"{'step ms predicted':>19}{'measured':>10}"]
    for name, r in result["runs"].items():
        lines.append(f"  {name:<9}{r['share']:>6.2f}{r['decode_tok_s']:>14.1f}{r['staged_mb']:>19.2f}{r['host_mb']:>14.2f}"
                     f"{r['predicted_step_s'] * 1e3:>19.1f}{r['step_s'] * 1e3:>10.1f}")
    lines.append(f"  planned / share 0: decode tok/s {result['decode_tok_s_ratio']:.2f}x")
    return lines


def _offload(link_gbps: float, budget_bytes: int) -> str:
    """How a scenario's offload regime reads in its table's heading."""
    return (f"offload regime (cpu backend, SIMULATED link {link_gbps:.3f} GB/s, device budget "
            f"{budget_bytes / 2**20:.0f} MiB)")
