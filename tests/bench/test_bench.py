"""`moegen bench`'s pieces on tiny checkpoints: the work count against hand-computed values, the
transformers scenario end to end (its parity check must pass: the two engines agree), and the
offload scenario's two modes under one budget and link."""

from __future__ import annotations

import json

import pytest
import torch

from click.testing import CliRunner

from moegen.bench.flops import model_work
from moegen.bench.offload import scenario as offload_scenario
from moegen.cli import main


def test_model_work_counts_what_one_token_touches(tiny_checkpoint):
    for layout in ("per-expert", "fused"):
        path = tiny_checkpoint("mixtral", layout)
        c = json.loads((path / "config.json").read_text())
        H, I, L, E, K = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_local_experts"],
                         c["num_experts_per_tok"])
        D = H // c["num_attention_heads"]
        attention = H * H * 2 + 2 * H * c["num_key_value_heads"] * D  # q, o; k, v
        work = model_work(path)
        assert work.layer_params == L * (attention + H * E + K * 3 * H * I)  # + the router; top_k experts
        assert work.head_params == c["vocab_size"] * H
        assert work.expert_params == 3 * H * I
        assert work.score_flops_per_ctx == L * 2 * c["num_attention_heads"] * 2 * D
        total = L * (attention + H * E + E * 3 * H * I + 2 * H) + 2 * c["vocab_size"] * H + H
        assert work.weight_bytes == 4 * total
        # One prompt of 3 tokens, 2 new: 4 tokens run through the layers (positions 1..4 see 1..4 keys).
        assert work.job_flops([3], 2) == 2 * work.layer_params * 4 + work.score_flops_per_ctx * 10 + 2 * 2 * work.head_params


def test_vs_transformers_scenario_end_to_end(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen3_moe")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--scenario", "vs-transformers", "--model", str(path), "--prompts", "6",
                                       "--new-tokens", "5", "--hf-batch", "4", "--json", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(out.read_text())
    run = data["scenarios"]["vs_transformers"][0]
    assert [r["engine"] for r in run["runs"]] == ["moegen serve-offline (no knobs)", "transformers generate, batch 4"]
    assert all(r["generated"] == 30 and r["seconds"] > 0 for r in run["runs"])
    parity = run["parity"]
    assert parity["total"] == 6 and parity["identical"] + parity["near_ties"] == 6 and not parity["failures"]
    assert 32 <= run["prompt_tokens"][0] <= run["prompt_tokens"][1] <= 129
    assert data["matmul_peak_flop_s"] > 1e9 and data["machine"]["cores"] >= 1
    assert "moegen / best transformers" in result.output


def test_offload_scenario_runs_both_modes_under_one_budget_and_link(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    # half the model's bytes: a third of a tiny model holds no launch's transient memory beside the slots
    result = offload_scenario(path, batch=16, prompt_len=2, new_tokens=4, seq_len=32, hide_tokens=50,
                              say=lambda text: None, budget_share=1 / 2)
    module, model = result["runs"]["module"], result["runs"]["model"]
    assert module["batch"] == 16 and 1 <= model["batch"] <= 16
    assert result["budget_bytes"] == model_work(path).weight_bytes // 2
    for run in (module, model):
        assert run["decode_steps"] >= 1 and run["decode_tokens"] == run["decode_steps"] * run["batch"]
        assert 0 < run["link_busy"] <= 1 and run["streamed_bytes"] > 0
    assert result["ratio"] == module["decode_tok_s"] / model["decode_tok_s"]
    fp8 = result["fp8"]
    plain, quantized = fp8["runs"]["auto"], fp8["runs"]["fp8-all"]
    for run in (plain, quantized):
        assert run["resident_experts"] == 0 and run["batch"] == 16 and run["decode_steps"] >= 1
        assert run["budget_bytes"] < model_work(path).weight_bytes
    # FP8 streams a quarter of float32's bytes, plus one float32 scale per block and the float32 norms and biases
    assert 2.5 < fp8["host_bytes_ratio"] < 4 and fp8["step_bytes_ratio"] > 2
    assert fp8["tok_s_ratio"] == quantized["decode_tok_s"] / plain["decode_tok_s"]


def test_fp8_quality_compares_completions_at_their_first_divergence():
    from moegen.bench.fp8_quality import compare
    from moegen.models.reference import Generation

    def gen(ids, rows):
        return Generation(prompt_ids=[1], token_ids=ids, logits=[torch.tensor(r) for r in rows])

    ref = [gen([3, 1], [[0.0, 1.0, 0.0, 2.0], [0.0, 5.0, 0.0, 0.0]]), gen([2, 2], [[0.0, 0.0, 1.0, 0.0]] * 2)]
    ours = [gen([3, 1], [[0.0, 1.0, 0.0, 2.0], [0.0, 5.0, 0.0, 0.0]]),  # identical
            gen([2, 0], [[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.8, 0.0]])]  # differs at position 1
    result = compare(ref, ours)
    assert result["identical"] == 1 and result["total"] == 2
    assert result["mean_abs_dlogit_at_divergence"] == pytest.approx((1.0 + 0.2) / 4)
    assert result["mean_ref_gap_at_divergence"] == pytest.approx(1.0)  # ref's logit of 2 minus its logit of 0
    assert result["max_abs_logit"] == 5.0


def test_fp8_quality_scenario_runs_each_choice(tiny_checkpoint):
    from moegen.bench.fp8_quality import scenario

    result = scenario(tiny_checkpoint("mixtral"), prompts=4, new_tokens=4, say=lambda text: None)
    for choice in ("fp8", "fp8-all"):
        c = result["choices"][choice]
        assert c["total"] == 4 and 0 <= c["identical"] <= 4 and c["bytes_after"] < c["bytes_before"] / 3


def test_paged_kv_scenario_runs_each_job_in_both_modes(tiny_checkpoint):
    from moegen.bench.paged_kv import PagedKVOptions, scenario
    from moegen.bench.report import paged_kv_table

    o = PagedKVOptions(requests=12, rows=2, paged_factor=4, prompt_len=(4, 8), max_new=40, mean_new=6, hide_tokens=50,
                       budget_share=1 / 2, questions=5, prefix_len=32, question_len=4, answer_tokens=2, prefix_batch=8)
    result = scenario(tiny_checkpoint("mixtral"), o, say=lambda text: None)
    tail = result["long_tail"]
    rows, paged = tail["runs"]["rows"], tail["runs"]["paged"]
    assert rows["batch_size"] == 2 and paged["batch_size"] == 8
    assert rows["host_kv_memory"] == paged["host_kv_memory"] and rows["blocks"] == paged["blocks"]
    # The pool holds exactly `rows` rows of max_seq_len: the row baseline never waits on blocks, paging fits more.
    assert rows["blocks"] == 2 * -(-tail["seq_len"] // rows["block_size"]) and rows["preemptions"] == 0
    assert rows["sequences_max"] == 2 < paged["sequences_max"] <= 8
    assert rows["generated"] == paged["generated"] == tail["caps_total"]  # each row its cap exactly (EOS ignored)
    for run in (rows, paged):
        assert run["admission_bound"]["trace_sequences_max"] == run["sequences_max"]  # the trace's counter agrees
        assert 0 < run["admission_bound"]["steps"] < run["steps"] and run["peak_rss_bytes"] > 0
    assert tail["ratios"]["sequences_max"] == paged["sequences_max"] / rows["sequences_max"]
    prefix = result["shared_prefix"]
    off, on = prefix["runs"]["no sharing"], prefix["runs"]["sharing"]
    prompt = o.prefix_len + o.question_len
    assert off["prefill_tokens"] == 5 * prompt and off["prefix_hit_tokens"] == 0
    # Sharing computes the prefix's full blocks once: the other 4 prompts find them.
    shared = prefix["shared_full_blocks"] * on["block_size"]
    assert shared == 32 and on["prefix_hit_tokens"] == 4 * shared
    assert on["prefill_tokens"] == off["prefill_tokens"] - 4 * shared
    assert on["generated"] == off["generated"] == 5 * o.answer_tokens
    assert "paged / rows" in "\n".join(paged_kv_table(result))


def test_host_attention_scenario_compares_share_0_with_the_planned_share(tiny_checkpoint):
    """Tiny sizes, a slow link and long contexts for the tiny model: both runs report the bytes per decode step
    from their traces; share 0 stages KV and sends nothing to the host; the planned run's share is the plan's,
    and with a share, less KV is staged and the host's copies appear."""
    from moegen.bench.host_attention import HostAttentionOptions, scenario
    from moegen.bench.report import host_attention_table

    o = HostAttentionOptions(requests=8, prompt_len=64, new_tokens=4, link_gbps=0.01, budget_share=1.5)
    result = scenario(tiny_checkpoint("mixtral"), o, say=lambda text: None)
    zero, planned = result["runs"]["share 0"], result["runs"]["planned"]
    assert zero["share"] == 0 and zero["staged_mb"] > 0 and zero["host_mb"] == 0
    assert planned["share"] == result["knobs"]["cpu_attention"]
    if planned["share"] > 0:
        assert planned["staged_mb"] < zero["staged_mb"] and planned["host_mb"] > 0
    for r in (zero, planned):
        assert r["decode_steps"] > 0 and r["predicted_step_s"] > 0 and r["step_s"] > 0
    assert "planned / share 0" in "\n".join(host_attention_table(result))
