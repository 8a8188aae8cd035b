"""Sampling, budgets, real offload and overlap, and failure handling of the runtime (cpu backend)."""

from __future__ import annotations

import threading
import traceback

import pytest
import torch

from moegen.models.hf_config import generation_eos_ids
from moegen.models.loader import load_checkpoint
from moegen.runtime.backend import DeviceBudgetError
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.engine import Engine
from moegen.runtime.residency import ModuleId
from moegen.runtime.requests import Request
from moegen.runtime.sampling import SamplingParams, sample, uniform

PROMPTS = [[1, 5, 9, 12], [1] + list(range(300, 330)), [1, 42], [1, 7, 7, 7, 100, 200], [1, 3]]


def engine_for(path, record_intervals=False, **knobs):
    cfg, weights, _ = load_checkpoint(path)
    return Engine(cfg, weights, RuntimeConfig(max_seq_len=64, **knobs), generation_eos_ids(path, cfg),
                  record_intervals=record_intervals)


def run(path, requests, record_intervals=False, **knobs):
    with engine_for(path, record_intervals, **knobs) as engine:
        return {r.id: r.token_ids for r in engine.generate(requests)}, engine


# -- sampling -------------------------------------------------------------------------------------


def sampled_requests(seed=10):
    return [Request(p, 10, temperature=0.9, top_k=50, top_p=0.95, seed=seed + i) for i, p in enumerate(PROMPTS)]


def test_same_seed_same_tokens_whatever_the_batch(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")
    runs = [run(path, sampled_requests(), batch_size=b, attn_micro_batch=m)[0] for b, m in ((1, 1), (2, 1), (5, 3))]
    assert runs[0] == runs[1] == runs[2]
    other_seeds = run(path, sampled_requests(seed=99), batch_size=5)[0]
    assert other_seeds != runs[0]
    greedy = run(path, [Request(p, 10) for p in PROMPTS])[0]
    assert greedy != runs[0]  # temperature 0.9 did sample


def test_sampling_rows_among_greedy_ones_draw_as_they_do_alone(tiny_checkpoint):
    """A step whose batch mixes greedy and sampling rows sorts only the sampling rows' logits: each
    row still gets the tokens it gets in a batch of one."""
    path = tiny_checkpoint("qwen3_moe")
    mixed = [Request(p, 10, temperature=0.9 if i % 2 else 0.0, top_p=0.8, seed=i, id=i) for i, p in enumerate(PROMPTS)]
    together = run(path, mixed, batch_size=len(mixed))[0]
    alone = {r.id: run(path, [r], batch_size=1)[0][r.id] for r in mixed}
    assert together == alone


def test_rows_that_keep_the_vocabulary_draw_alike_beside_rows_that_cut_it(tiny_checkpoint):
    """A step whose sampling rows all keep the whole vocabulary draws without sorting it; one that also has rows
    cutting it (top-p, top-k) sorts: each row gets the same tokens either way, as in a batch of one."""
    path = tiny_checkpoint("qwen3_moe")
    cuts = [dict(top_p=0.8), dict(top_k=5), {}, {}, {}]
    mixed = [Request(p, 10, temperature=0.0 if i == 4 else 0.9, seed=i, id=i, **cuts[i % len(cuts)])
             for i, p in enumerate(PROMPTS)]
    together = run(path, mixed, batch_size=len(mixed))[0]
    alone = {r.id: run(path, [r], batch_size=1)[0][r.id] for r in mixed}
    assert together == alone


def test_top_k_1_is_greedy(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    greedy = run(path, [Request(p, 8) for p in PROMPTS])[0]
    top1 = run(path, [Request(p, 8, temperature=1.5, top_k=1, seed=i) for i, p in enumerate(PROMPTS)])[0]
    assert top1 == greedy


def test_uniform_draws_are_uniform_and_counter_based():
    seeds = torch.arange(20000, dtype=torch.int64)
    u = uniform(seeds, torch.zeros_like(seeds))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005  # U(0,1): mean 1/2, var 1/12
    assert torch.equal(uniform(seeds[5:6], torch.zeros(1, dtype=torch.int64)), u[5:6])  # depends on (seed, n) only


def test_top_k_and_top_p_masks_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    seeds = torch.arange(4000, dtype=torch.int64)

    def picks(top_k, top_p, cuts=None):
        p = SamplingParams(temperature=torch.ones(4000), top_k=torch.full((4000,), top_k),
                           top_p=torch.full((4000,), top_p), seeds=seeds, counters=torch.zeros(4000, dtype=torch.int64),
                           greedy_only=False, cuts=cuts)
        return sample(logits, p)

    def draws(top_k, top_p):
        return torch.bincount(picks(top_k, top_p), minlength=4).float() / 4000

    assert torch.allclose(draws(0, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    assert torch.equal(picks(0, 1.0, cuts=False), picks(0, 1.0))  # the sort skipped: the same draws
    assert torch.equal(picks(2, 0.7, cuts=True), picks(2, 0.7))  # only the sorted draw: the same draws
    k2 = draws(2, 1.0)  # renormalised over the two best: 0.5/0.8, 0.3/0.8
    assert k2[2:].sum() == 0 and abs(float(k2[0]) - 0.625) < 0.03
    p7 = draws(0, 0.7)  # smallest prefix reaching 0.7: tokens 0 and 1
    assert p7[2:].sum() == 0 and abs(float(p7[0]) - 0.625) < 0.03
    assert draws(0, 0.4)[0] == 1.0  # the top token alone reaches 0.4


# -- budgets and offload --------------------------------------------------------------------------


def test_a_budget_too_small_fails_before_any_work(tiny_checkpoint):
    with pytest.raises(DeviceBudgetError, match="--gpu-memory"):
        engine_for(tiny_checkpoint("olmoe"), gpu_memory=50_000)


def test_offload_copies_what_each_step_uses_within_the_budget(tiny_checkpoint):
    path = tiny_checkpoint("mixtral")
    # A budget for the core, KV staging, activations and transient memory, every non-expert module and 3
    # experts; the transient memory follows the budget (a launch's workspace is a share of it), so the
    # budget is their fixed point, found by building engines (nothing run).
    budget = 2**40
    for _ in range(64):
        with engine_for(path, gpu_memory=budget) as probe:
            placement = probe.runtime.placement
            blocks = placement.blocks
            on_device = sum(b.nbytes for m, b in blocks.items() if not placement.streamed(m)) + sum(
                pool.count * max(b.nbytes for m, b in blocks.items() if m.kind == kind)
                for kind, pool in placement.pools.items())
            cores = probe.backend.counters.device_bytes - on_device
        expert_bytes = max(b.nbytes for m, b in blocks.items() if m.kind == "expert")
        budget, was = cores + 3 * expert_bytes + sum(b.nbytes for m, b in blocks.items() if m.kind != "expert"), budget
        if budget == was:
            break
    tokens, engine = run(path, [Request(p, 6) for p in PROMPTS], gpu_memory=budget)
    counters, placement = engine.backend.counters, engine.runtime.placement
    streamed = [m for m in placement.blocks if placement.streamed(m)]
    assert streamed and all(m.kind == "expert" for m in streamed)
    steps = engine.stats.steps
    # Each step either copied each streamed expert or skipped it because it had no tokens; the prefetcher
    # may also have copied an expert for a step after the last one (it walks ahead before a step is planned).
    assert all(placement.fills[m] + placement.skips[m] in (steps, steps + 1) for m in streamed)
    assert counters.h2d_weight_bytes == sum(placement.fills[m] * placement.blocks[m].nbytes for m in streamed)
    used = sum(n > 0 for counts in engine.stats.expert_counts for n in counts)  # (step, layer, expert) with tokens
    assert sum(placement.fills.values()) >= used
    assert counters.device_high_water <= budget
    assert tokens == run(path, [Request(p, 6) for p in PROMPTS])[0]  # same tokens as everything resident


def overlap_seconds(a, b) -> float:
    """Time both interval lists are busy at once."""
    return sum(max(0.0, min(end, e) - max(start, s)) for start, end in a for s, e in b)


def test_two_expert_slots_overlap_copy_and_compute_more_than_one(tiny_checkpoint):
    """Every expert streamed over a simulated 0.1 GB/s link, with enough tokens per expert that its
    compute is comparable to its copy. With one slot the next expert's copy must wait for the last
    one's compute; with two it runs during it. Overlap is measured from the streams' own timelines."""
    path = tiny_checkpoint("mixtral")
    requests = [Request([1] + list(range(10 + i, 70 + i)), 2) for i in range(16)]
    share = {}
    for slots in (1, 2):
        _, engine = run(path, requests, record_intervals=True, expert_slots=slots, sim_link_gbps=0.1, batch_size=16)
        b = engine.backend
        both = overlap_seconds(b.compute.intervals, b.h2d_weights.intervals)
        share[slots] = both / min(b.counters.busy_s["compute"], b.counters.busy_s["copy H2D weights"])
    assert share[2] > 0.4 and share[2] > 1.5 * share[1], share


# -- failure --------------------------------------------------------------------------------------


def _explode(*args):
    raise RuntimeError("expert launch failed on purpose")


@pytest.mark.parametrize("where", ["moegen.runtime.tasks.moe._run_expert", "moegen.runtime.placement.Placement.fill"])
def test_a_failing_task_cancels_the_run_with_its_exception(tiny_checkpoint, monkeypatch, where):
    monkeypatch.setattr(where, _explode)
    before = set(threading.enumerate())
    with engine_for(tiny_checkpoint("mixtral"), expert_slots=2) as engine:
        with pytest.raises(RuntimeError, match="failed on purpose") as exc:
            list(engine.generate([Request(p, 4) for p in PROMPTS]))
        frames = [f.name for f in traceback.extract_tb(exc.value.__traceback__)]
        assert "_explode" in frames  # the original traceback, not a wrapper's
    leftover = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not leftover, leftover  # the loop thread and every stream thread are gone


def test_module_ids_name_themselves():
    assert str(ModuleId("expert", 2, 5)) == "expert[2][5]" and str(ModuleId("attn", 0)) == "attn[0]"


def test_an_engine_runs_again_after_the_prefetcher_filled_slots_for_a_step_that_never_came(tiny_checkpoint):
    """With one expert slot, the prefetcher's walk ahead of the last step holds that slot at the end of
    the run; the next run on the same engine must start with it free, and give the same tokens."""
    path = tiny_checkpoint("mixtral")
    requests = [Request(p, 5) for p in PROMPTS]
    with engine_for(path, expert_slots=1, gpu_memory=2**40) as engine:
        first = {r.id: r.token_ids for r in engine.generate(requests)}
        fills = sum(engine.runtime.placement.fills.values())
        second = {r.id: r.token_ids for r in engine.generate(requests)}
        assert sum(engine.runtime.placement.fills.values()) > fills  # it streamed again
    assert first == second == run(path, requests)[0]
