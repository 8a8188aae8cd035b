"""The scheduler over the paged KV cache, fed synthetic sampled tokens (no model): blocks taken as sequences
grow, admission against the expected growth, preemption by recompute, shared prefixes, nothing leaked."""

from __future__ import annotations

from tests.runtime.test_scheduler import run, scheduler

from moegen.runtime.kv.prefix import block_names
from moegen.runtime.requests import Request

EOS = 0


def no_leak(s) -> bool:
    """Every block of the pool is unheld (free, or a cached prefix block nobody holds)."""
    pool = s.kv.pool
    return pool.num_free == pool.num_blocks and not any(pool.refs)


def test_blocks_are_taken_as_a_sequence_grows_and_returned_when_it_finishes():
    """A 5-token prompt in blocks of 4 holds 2 blocks for its prefill, a third once its KV passes 8 tokens."""
    s = scheduler([Request([3] * 5, max_new_tokens=6)], batch_size=1, max_step_tokens=64)
    held = []
    while (plan := s.next_step()) is not None:
        held.append(len(plan.blocks[0]))
        s.finish_step(plan, [5])
    # KV tokens after each step's feed: 5, 6, 7, 8, 9, 10 -> blocks 2, 2, 2, 2, 3, 3
    assert held == [2, 2, 2, 2, 3, 3]
    assert no_leak(s)


def test_equal_caps_reserve_the_worst_case_until_outputs_end_early():
    """Ten 4-token prompts of max_new_tokens 8 (11 KV tokens: 3 blocks each) in 12 blocks: at first only what
    every sequence's cap needs is admitted (4 of them); once the first outputs end after one token (EOS), the
    expected length falls and more run at once."""
    requests = [Request([3, 4, 5, 6], max_new_tokens=8, id=i) for i in range(10)]
    stop_early = {0, 1, 2, 3}
    s = scheduler(requests, batch_size=10, max_step_tokens=64, blocks=12)
    plans, results = run(s, lambda seq: EOS if seq.result.id in stop_early else 5)
    assert len(plans[0].seqs) == 4  # 4 x 3 blocks: the worst case
    assert max(len(p.seqs) for p in plans) > 4  # admitted on the expected length once outputs ended early
    assert sorted(r.id for r in results) == list(range(10))
    assert all(len(r.token_ids) == (1 if r.id in stop_early else 8) for r in results)
    assert no_leak(s)


def test_a_sequence_preempted_when_blocks_run_out_recomputes_and_loses_nothing():
    """Outputs that end at once lower the expectation; the long ones admitted on it then outgrow the pool, the
    newest is preempted (its blocks freed), readmitted with its prompt + output as the feed, and finishes with
    every token; the stats count it."""
    requests = [Request([3, 4, 5, 6], max_new_tokens=12, id=i) for i in range(8)]
    short = {0, 1, 2, 3}
    s = scheduler(requests, batch_size=8, max_step_tokens=64, blocks=10)
    feeds = {}  # id -> the feeds it was admitted with
    plans = []
    while (plan := s.next_step()) is not None:
        plans.append(plan)
        for seq, q, past in zip(plan.seqs, plan.q_lens, plan.past_lens):
            if q > 1:
                feeds.setdefault(seq.result.id, []).append((past, q, len(seq.result.token_ids)))
        results = s.finish_step(plan, [EOS if seq.result.id in short else 7 for seq in plan.seqs])
        for r in results:
            assert len(r.token_ids) == (1 if r.id in short else 12), r
    stats = s.kv.stats
    assert stats.preemptions > 0
    again = {i: f for i, f in feeds.items() if len(f) > 1}
    assert again, feeds
    for i, f in again.items():
        for past, q, produced in f[1:]:  # readmitted: the prompt and every token produced, computed again but
            assert past in (0, 4) and past + q == 4 + produced and produced > 0  # the prompt's block, if still cached
    assert stats.recomputed_tokens == sum(q - 1 for f in again.values() for _, q, _ in f[1:])
    assert all(sum(len(p.blocks[j]) for j in range(len(p.seqs))) <= 10 for p in plans)
    assert no_leak(s)


def test_a_sequence_that_alone_outgrows_the_pool_finishes_as_length():
    """3 blocks of 4 hold 12 tokens: a 4-token prompt asking for 20 stops after 9 outputs (the 9th would need a
    13th KV position), finish_reason "length", counted."""
    s = scheduler([Request([3, 4, 5, 6], max_new_tokens=20)], batch_size=1, max_step_tokens=64, blocks=3)
    _, (result,) = run(s)
    assert len(result.token_ids) == 9 and result.finish_reason == "length"
    assert s.kv.stats.outgrew_pool == 1 and no_leak(s)


def test_prompts_sharing_a_prefix_prefill_it_once_after_the_first():
    """Three prompts of one 9-token prefix + their own 2 tokens, blocks of 4: the first computes all 11; the
    others wait a step (the prefix blocks are being computed), then find the 2 full prefix blocks and prefill 3
    tokens. The prefix blocks are stored once: held by all three at once."""
    prefix = list(range(10, 19))
    requests = [Request(prefix + [50 + i, 60 + i], max_new_tokens=3, id=i) for i in range(3)]
    s = scheduler(requests, batch_size=3, max_step_tokens=64)
    plans, results = run(s)
    assert plans[0].q_lens == [11]  # the others deferred
    assert plans[1].q_lens == [1, 3, 3] and plans[1].past_lens == [11, 8, 8]
    first = plans[1].blocks
    assert first[0][:2] == first[1][:2] == first[2][:2]
    assert s.kv.pool.refs.count(0) == s.kv.pool.num_blocks  # (all released at the end)
    stats = s.kv.stats
    assert stats.prefill_tokens == 11 + 3 + 3 and stats.prefix_hit_tokens == 16
    assert s.kv.pool.peek(block_names(prefix, 4)[1]) is not None  # cached after the job, for a later prompt
    assert no_leak(s)


def test_without_prefix_sharing_every_prompt_prefills_whole():
    prefix = list(range(10, 19))
    requests = [Request(prefix + [50 + i, 60 + i], max_new_tokens=3, id=i) for i in range(3)]
    s = scheduler(requests, batch_size=3, max_step_tokens=64, sharing=False)
    plans, _ = run(s)
    assert plans[0].q_lens == [11, 11, 11] and s.kv.stats.prefix_hit_tokens == 0
    assert len({b for p in plans[:1] for held in p.blocks for b in held}) == 9  # 3 blocks each, none shared


def test_a_drained_run_finishes_what_it_admitted_preempted_ones_too_and_leaks_nothing():
    """Drained once a preempted sequence waits to recompute: nothing new is admitted, but every sequence that had
    started (the preempted one among them) finishes with all its tokens."""
    requests = [Request([3, 4, 5, 6], max_new_tokens=12, id=i) for i in range(16)]
    short, draining = {0, 1, 2, 3}, []
    s = scheduler(requests, batch_size=8, max_step_tokens=64, blocks=10, admitting=lambda: not draining)
    started, results = set(), []
    while (plan := s.next_step()) is not None:
        if not draining and any(seq.result.token_ids for seq in s.waiting):
            draining.append(True)
        started |= {seq.result.id for seq in plan.seqs}
        results += s.finish_step(plan, [EOS if seq.result.id in short else 7 for seq in plan.seqs])
    assert draining and s.kv.stats.preemptions > 0
    assert sorted(r.id for r in results) == sorted(started) and len(started) < 16
    assert all(len(r.token_ids) == (1 if r.id in short else 12) for r in results)
    assert no_leak(s)


def test_closing_a_run_ended_mid_way_releases_every_block():
    requests = [Request([3, 4, 5, 6], max_new_tokens=12, id=i) for i in range(8)]
    s = scheduler(requests, batch_size=8, max_step_tokens=64, blocks=10)
    plan = s.next_step()
    s.finish_step(plan, [5] * len(plan.seqs))
    s.next_step()  # in flight when the run ends (a cancelled run)
    s.close()
    assert no_leak(s)


def test_rows_with_their_own_caps_are_expected_to_reach_them_and_never_preempted():
    """Caps 12 and 2 alternating (the workload says what it expects): outputs that end early don't lower what
    the others are expected to hold, so a pool too small for all at once admits fewer and preempts none."""
    from moegen.runtime.kv.block_pool import BlockPool
    from moegen.runtime.kv.manager import KVManager, KVStats
    from moegen.runtime.scheduler import Scheduler

    requests = [Request([3, 4, 5, 6], max_new_tokens=12 if i % 2 else 2, id=i) for i in range(12)]
    kv = KVManager(BlockPool(10), 4, KVStats(10, 4, True), 12, adaptive=False)
    s = Scheduler(requests, 12, eos_ids=(0,), max_step_tokens=64, kv=kv)
    _, results = run(s, lambda seq: EOS if seq.result.id % 4 == 1 else 7)
    assert len(results) == 12 and kv.stats.preemptions == 0 and no_leak(s)
