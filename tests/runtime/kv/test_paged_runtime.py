"""The engine over the paged host KV cache: shared prefixes computed once with transformers' tokens, sampled
outputs unchanged by preemption, and no block leaked by a finished, drained or cancelled run."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moegen.models.hf_config import generation_eos_ids
from moegen.models.kv_cache import kv_bytes_per_token
from moegen.models.loader import load_checkpoint
from moegen.parity import compare_greedy
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.engine import Engine
from moegen.runtime.requests import Request

PREFIX = [1] + [(37 * j) % 500 + 5 for j in range(299)]  # 300 tokens (1 = BOS)
QUESTIONS = [[7, 8, 9], [400, 3], [11, 12, 13, 14, 15], [250, 251]]


def engine_for(path, **knobs) -> Engine:
    cfg, weights, _ = load_checkpoint(path)
    return Engine(cfg, weights, RuntimeConfig(**knobs), generation_eos_ids(path, cfg))


def no_leak(engine: Engine) -> bool:
    pool = engine.runtime.kv_pool
    return pool.num_free == pool.num_blocks and not any(pool.refs)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_prompts_sharing_a_300_token_prefix_prefill_it_once_and_match_transformers(family, tiny_checkpoint):
    """Four prompts of one 300-token prefix and their own question, with and without sharing: the same
    tokens, each matching transformers' greedy run of the prompt alone; with sharing, every prompt after the
    first prefills the prefix's 18 full blocks of 16 tokens (288 tokens) fewer."""
    path = tiny_checkpoint(family)
    prompts = [PREFIX + q for q in QUESTIONS]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    oracle = []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
        oracle.append((out.sequences[0, len(p):].tolist(), [step[0] for step in out.logits]))
    computed = {}
    for sharing in (True, False):
        with engine_for(path, max_seq_len=320, batch_size=4, kv_block_size=16, prefix_sharing=sharing) as engine:
            results = {r.id: r.token_ids for r in engine.generate([Request(p, 6) for p in prompts])}
        for i, (ids, logits) in enumerate(oracle):
            verdict = compare_greedy(results[i], ids, None, logits)
            assert verdict.ok, f"sharing={sharing}, prompt {i}: {verdict.detail}"
        computed[sharing] = engine.stats.kv.prefill_tokens
        assert no_leak(engine)
        if sharing:
            assert engine.stats.kv.prefix_hit_tokens == 3 * 288
    assert computed[False] - computed[True] == 3 * 288
    assert computed[False] == sum(map(len, prompts))


def test_sampled_outputs_are_the_same_when_preempted(tiny_checkpoint):
    """Sampling is counted per request: a run whose blocks run out (preempting and recomputing sequences)
    samples the very tokens of a run with room for every sequence. The first six requests stop at any even id
    (their outputs end early, so the rest are admitted expecting short outputs too, and outgrow the pool)."""
    path = tiny_checkpoint("qwen3_moe")
    cfg = load_checkpoint(path)[0]
    per_token = kv_bytes_per_token(cfg, torch.float32)
    evens = tuple(range(0, cfg.vocab_size, 2))
    requests = [Request([1, 20 + i, 30 + i, 40 + i], 16, temperature=0.9, top_p=0.95, seed=i,
                        stop_token_ids=evens if i < 6 else ()) for i in range(12)]
    got = {}
    for blocks in (None, 12):
        memory = None if blocks is None else blocks * 4 * per_token
        with engine_for(path, max_seq_len=32, batch_size=12, kv_block_size=4, host_kv_memory=memory) as engine:
            got[blocks] = {r.id: r.token_ids for r in engine.generate(requests)}
        assert (engine.stats.kv.preemptions > 0) == (blocks is not None), engine.stats.kv
        assert no_leak(engine)
    assert got[12] == got[None]


def test_a_drained_and_a_cancelled_run_leave_every_block_free(tiny_checkpoint):
    path = tiny_checkpoint("olmoe")
    requests = [Request([1, 3 + i, 9, 12, 40 + i], 6 + i % 5, ignore_eos=True) for i in range(24)]
    with engine_for(path, max_seq_len=32, batch_size=6, kv_block_size=4) as engine:
        drained = []
        for result in engine.generate(requests):
            drained.append(result)
            engine.drain()  # after the first result: the ones in flight finish, no more are admitted
        assert 1 < len(drained) < len(requests) and no_leak(engine)
        for result in engine.generate(requests):
            break  # the caller stops early: the run is cancelled with sequences in flight
        assert no_leak(engine)
        assert len(list(engine.generate(requests))) == len(requests) and no_leak(engine)  # and runs again
