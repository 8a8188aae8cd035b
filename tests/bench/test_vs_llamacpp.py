"""The vs-llamacpp scenario's pieces that need no llama.cpp build (the build and the runs are a bench, not in
CI): what it reads from llama-batched-bench, what a checkpoint needs at load, the prompts, and a machine
that can't build llama.cpp getting a reason and no row."""

from __future__ import annotations

import json

from click.testing import CliRunner
from transformers import AutoTokenizer

from moegen.bench import llamacpp
from moegen.bench.vs_llamacpp import distinct_prompts
from moegen.cli import main

# The table llama-batched-bench prints (llama.cpp as vendored by llama-cpp-python 0.3.36), log lines around it.
BATCHED_BENCH = """main: n_kv_max = 33024, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, n_threads = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    64 |     64 |  256 |  32768 |   11.141 |  1470.56 |   22.721 |   721.10 |   33.862 |   967.69 |

llama_perf_context_print:        load time =     412.01 ms
"""


def test_the_batched_bench_row_is_read_by_its_columns():
    row = llamacpp.parse_batched_bench(BATCHED_BENCH)
    assert row["B"] == 256 and row["T_TG s"] == 22.721 and row["S_PP t/s"] == 1470.56
    assert llamacpp.parse_batched_bench("no table here") == {}


def test_a_deepseek_v2_without_q_lora_is_loaded_as_lite(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v2", "q_lora_rank": None}))
    assert llamacpp.load_overrides(tmp_path) == ["--override-kv", "deepseek2.attention.q_lora_rank=int:0"]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    assert llamacpp.load_overrides(tmp_path) == []


def test_prompts_are_distinct_from_their_first_tokens_and_of_the_asked_length(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("mixtral"))
    prompts = distinct_prompts(tokenizer, 40, 32)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    assert all(abs(len(i) - 32) <= 1 for i in ids), sorted(map(len, ids))
    assert len({tuple(i[:8]) for i in ids}) == 40  # no two share even a first half-block of 16


def test_no_compiler_means_no_row_and_a_reason(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp.shutil, "which", lambda tool: None)
    monkeypatch.setenv("MOEGEN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--scenario", "vs-llamacpp", "--model", str(tiny_checkpoint("mixtral")),
                                       "--prompts", "4", "--new-tokens", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "not run: llama.cpp can't be built here: no cmake or c++ on PATH" in result.output
    raw = json.loads(out.read_text())["scenarios"]
    assert "vs_llamacpp" not in raw and "no cmake or c++" in raw["vs_llamacpp_unavailable"]
    assert not (tmp_path / "cache" / "llama.cpp").exists()  # nothing downloaded or built
