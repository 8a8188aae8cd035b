"""serve-offline and the host KV cache's bounds: a row whose prompt the cache can't hold is an error record
naming --host-kv-memory while the others run; a cache that holds no row's prompt, or not even one block, is an
error before any work; the stats JSON records what the cache did."""

from __future__ import annotations

import json

import torch

from tests.io.test_serve_offline import Oracle, by_id, failed, ok, read_lines, serve, write_jsonl

from moegen.models.hf_config import load_model_config
from moegen.models.kv_cache import kv_bytes_per_token

LONG = " ".join(["the experts route every token"] * 12)


def kv_memory(model_dir, tokens: int) -> int:
    """--host-kv-memory for exactly `tokens` tokens (float32, the cpu default)."""
    return tokens * kv_bytes_per_token(load_model_config(model_dir), torch.float32)


def test_a_prompt_too_long_for_the_cache_is_a_row_error_and_the_others_run(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("olmoe")
    oracle = Oracle(model_dir)
    assert len(oracle.prompt_ids(LONG)) > 64
    rows = [{"prompt": "Hi"}, {"prompt": LONG}, {"prompt": "Once upon a time"}]  # ids: 0, 1, 2
    data, out, stats = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", tmp_path / "stats.json"
    ok(serve(model_dir, data, out, "--host-kv-memory", kv_memory(model_dir, 64), "--kv-block-size", 16,
             "--stats-json", stats, max_new=4))
    got = by_id(read_lines(out))
    assert "--host-kv-memory" in got[1]["error"] and "line 2" in got[1]["error"]
    for key, text in ((0, "Hi"), (2, "Once upon a time")):
        expected = oracle.expected(oracle.prompt_ids(text), 4)
        assert {k: got[key][k] for k in expected} == expected
    kv = json.loads(stats.read_text())["kv"]
    assert kv["blocks"] == 4 and kv["block_size"] == 16 and kv["prefill_tokens"] > 0


def test_a_cache_that_holds_no_prompt_or_no_block_is_an_error_at_start(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("olmoe")
    data = write_jsonl(tmp_path / "in.jsonl", [{"prompt": LONG}])
    out = tmp_path / "out.jsonl"
    result = failed(serve(model_dir, data, out, "--host-kv-memory", kv_memory(model_dir, 32), "--kv-block-size", 16))
    assert "no prompt fits" in result.output and "--host-kv-memory" in result.output
    result = failed(serve(model_dir, data, out, "--host-kv-memory", kv_memory(model_dir, 15), "--kv-block-size", 16))
    assert "holds no KV block" in result.output
    assert read_lines(out) == []
