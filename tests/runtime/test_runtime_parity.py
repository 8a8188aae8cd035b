"""The runtime's greedy tokens equal transformers', every family, with the knobs varied.

The oracle is transformers `generate(do_sample=False)` on each prompt alone (float32), run here.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moegen.models.hf_config import generation_eos_ids
from moegen.models.loader import load_checkpoint
from moegen.parity import compare_greedy
from moegen.runtime.config import RuntimeConfig
from moegen.models.kv_cache import kv_bytes_per_token
from moegen.runtime.device_memory import activation_bytes, launch_sizes, transient_bytes
from moegen.runtime.engine import Engine
from moegen.runtime.residency import minimum_device_bytes
from moegen.runtime.requests import Request

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "minimax_m2"]
NEW_TOKENS = 12
# Seven prompts of different lengths (ids of the 512-token tiny vocabulary; 1 = BOS).
PROMPTS = [[1, 5, 9, 12], [1] + list(range(300, 340)), [1, 42], [1, 7, 7, 7, 100, 200], [1, 3],
           [1] + list(range(60, 90, 2)), [1, 250, 251, 17]]

KNOBS = {
    "defaults": {},
    # B < prompts: finished sequences are refilled mid-run; one sequence per attention launch;
    # one token per expert launch; one expert slot (every expert streamed, no overlap).
    "refill-mb1-slots1": dict(batch_size=3, attn_micro_batch=1, expert_micro_batch=1, expert_slots=1),
    # Odd micro-batches, two expert slots.
    "odd-slots2": dict(batch_size=5, attn_micro_batch=3, expert_micro_batch=5, expert_slots=2),
    # Grouped expert launches off: every resident expert its own launch.
    "groups-off": dict(expert_groups=False),
    # Grouped launches whose members run in launches of at most 3 tokens.
    "groups-cap3": dict(batch_size=5, expert_micro_batch=3),
    # The first 3 experts in layer order resident (grouped), the rest streamed through 2 slots (each alone).
    "groups-and-streamed": dict(resident_experts=3, expert_slots=2),
    # The published baselines' policy: one batch walks the whole model, its KV on the device.
    "model-batching": dict(batching="model", expert_slots=2),
}


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint):
    """family -> (checkpoint, transformers' greedy ids and logits per prompt), computed once."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tiny_checkpoint(family)
            cache[family] = (path, transformers_runs(path))
        return cache[family]

    return get


def transformers_runs(path) -> list[tuple[list[int], list[torch.Tensor]]]:
    """transformers' greedy ids and logits for each of PROMPTS alone (float32): the oracle."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runs = []
    for prompt in PROMPTS:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
        runs.append((out.sequences[0, len(prompt):].tolist(), [step[0] for step in out.logits]))
    return runs


def new_tokens(i: int) -> int:
    """Requests finish at different steps, so freed rows are refilled while others still decode."""
    return NEW_TOKENS - 4 * (i % 3)


def run_engine(path, **knobs):
    cfg, weights, _ = load_checkpoint(path)
    rcfg = RuntimeConfig(max_seq_len=64, **knobs)
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg)) as engine:
        results = list(engine.generate([Request(p, new_tokens(i)) for i, p in enumerate(PROMPTS)]))
        return {r.id: r for r in results}, engine


def assert_parity(results, runs):
    failures = []
    for i, (ids, logits) in enumerate(runs):
        n = new_tokens(i)  # greedy: a shorter run is a prefix of the oracle's
        verdict = compare_greedy(results[i].token_ids, ids[:n], None, logits[:n])
        if not verdict.ok:
            failures.append(f"prompt {i}: {verdict.detail}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("knobs", sorted(KNOBS))
@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_matches_transformers(family, knobs, oracle):
    path, runs = oracle(family)
    results, _ = run_engine(path, **KNOBS[knobs])
    assert_parity(results, runs)


def resident_bytes(path) -> int:
    """A device budget that holds the core, staging and activations but only part of the modules."""
    _, engine = run_engine(path, batch_size=4, gpu_memory=2**40)  # a budget, so KV staging is counted too
    placed = engine.backend.counters.device_bytes
    module_bytes = sum(b.nbytes for b in engine.runtime.placement.blocks.values())
    return placed - module_bytes * 3 // 4


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_runtime_under_a_device_budget_that_forces_offload(family, oracle):
    path, runs = oracle(family)
    budget = resident_bytes(path)
    results, engine = run_engine(path, batch_size=4, gpu_memory=budget)
    counters, placement = engine.backend.counters, engine.runtime.placement
    assert placement.pools, "the budget was meant to force slot pools"
    assert sum(placement.fills.values()) > 0 and counters.h2d_weight_bytes > 0
    assert counters.device_high_water <= budget
    assert_parity(results, runs)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_model_batching_takes_the_batch_that_fits_the_budget(family, oracle):
    path, runs = oracle(family)
    cfg, weights, _ = load_checkpoint(path)
    # A budget for the smallest weight placement plus 3 sequences' KV, activations and transient memory; the
    # last follows the budget (a launch's workspace is a share of it), so the budget is their fixed point.
    S, fits = 64, 3
    rcfg = RuntimeConfig(max_seq_len=S, batching="model", batch_size=fits)
    steps = min(fits * S, rcfg.max_step_tokens)  # the largest step's tokens
    fixed = (minimum_device_bytes(weights, torch.float32, None) + fits * S * kv_bytes_per_token(cfg, torch.float32)
             + activation_bytes(cfg, rcfg, steps, fits))
    budget = 2**40
    for _ in range(64):
        sizes = launch_sizes(cfg, rcfg, budget, steps, fits, fits)
        budget, was = fixed + transient_bytes(cfg, rcfg, sizes, steps, fits, fits), budget
        if budget == was:
            break
    results, engine = run_engine(path, batching="model", gpu_memory=budget)
    B = engine.runtime.batch_size
    assert B == fits  # the device KV bounds the batch, so rows are refilled
    assert engine.runtime.micro_batch == B  # the whole batch in one attention launch
    assert engine.backend.counters.device_high_water <= budget
    assert engine.backend.counters.d2h_bytes < 64 * len(PROMPTS)  # no KV write-back, only sampled ids/counts
    assert_parity(results, runs)


def test_tied_embeddings_are_looked_up_on_the_device(tiny_checkpoint):
    """A checkpoint whose lm_head is its embedding: the table is on the device anyway, so the lookup
    runs there (untied, the table stays on the host and only the rows cross)."""
    path = tiny_checkpoint("qwen3_moe", tie_word_embeddings=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runs = []
    for prompt in PROMPTS:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
        runs.append((out.sequences[0, len(prompt):].tolist(), [step[0] for step in out.logits]))
    results, engine = run_engine(path, batch_size=4, gpu_memory=2**40)
    assert not engine.runtime.placement.embed_on_host
    assert_parity(results, runs)
    _, engine = run_engine(tiny_checkpoint("qwen3_moe"), batch_size=4, gpu_memory=2**40)
    assert engine.runtime.placement.embed_on_host


def stop_early(runs) -> tuple[set[int], list[list[int]]]:
    """Stop ids that end each of the three longest prompts' outputs early and none of the others': for each, the
    first token of its oracle output that no other prompt's output holds. Returns them, and each prompt's oracle
    tokens cut at its first stop id (a stop id ends the output after it)."""
    longest = sorted(range(len(PROMPTS)), key=lambda i: -len(PROMPTS[i]))[:3]
    others = {t for i, (ids, _) in enumerate(runs) if i not in longest for t in ids}
    stops = {next(t for t in runs[i][0] if t not in others) for i in longest}
    cut = []
    for ids, _ in runs:
        end = next((k + 1 for k, t in enumerate(ids) if t in stops), len(ids))
        cut.append(ids[:end])
    return stops, cut


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_kv_too_small_for_every_sequence_preempts_and_keeps_parity(family, oracle):
    """Every request may reach NEW_TOKENS (one cap, so admission expects from the lengths seen); the three
    admitted first end early (stop ids from the oracle's outputs), so the other four are admitted on that
    expectation into 12 blocks of 4 tokens, too few for them all to reach their cap (16 blocks): the newest are
    preempted and recomputed, and every output still matches transformers'."""
    path, runs = oracle(family)
    cfg, weights, _ = load_checkpoint(path)
    stops, expected = stop_early(runs)
    block, blocks = 4, 12
    rcfg = RuntimeConfig(max_seq_len=64, batch_size=8, kv_block_size=block,
                         host_kv_memory=blocks * block * kv_bytes_per_token(cfg, torch.float32))
    requests = [Request(p, NEW_TOKENS, stop_token_ids=tuple(stops)) for p in PROMPTS]
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg)) as engine:
        results = {r.id: r for r in engine.generate(requests)}
    assert engine.runtime.kv_blocks == blocks and engine.stats.kv.preemptions > 0, engine.stats.kv
    failures = [f"prompt {i}: {v.detail}" for i, (ids, logits) in enumerate(runs)
                if not (v := compare_greedy(results[i].token_ids, expected[i], None, logits[:len(expected[i])])).ok]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_host_attention_keeps_parity(family, share, oracle):
    """A share of each decode step's sequences attends on the host over the paged cache, under a device budget
    and a simulated link (KV staged for the rest): every output still matches transformers'."""
    path, runs = oracle(family)
    results, engine = run_engine(path, batch_size=4, gpu_memory=2**40, sim_link_gbps=50.0, kv_block_size=4,
                                 cpu_attention=share)
    assert (engine.stats.host_attended > 0) == (share > 0)
    assert_parity(results, runs)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_attention_split_over_the_cpu_lanes_keeps_parity(family, oracle, attention_split):
    """Every decode micro-batch of two or more sequences attends as two launches side by side on the lanes."""
    path, runs = oracle(family)
    results, _ = run_engine(path, attn_micro_batch=5)
    assert 2 in attention_split and 1 in attention_split  # decode micro-batches split, prefill ones (and single sequences) not
    assert_parity(results, runs)
