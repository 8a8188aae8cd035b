"""Which sequences the scheduler admits into each step, fed synthetic sampled tokens (no model)."""

from __future__ import annotations

from moegen.runtime.kv.block_pool import BlockPool
from moegen.runtime.kv.manager import KVManager, KVStats
from moegen.runtime.requests import Request
from moegen.runtime.scheduler import Scheduler


def scheduler(requests, batch_size: int, max_step_tokens: int, blocks: int = 1000, block_size: int = 4,
              sharing: bool = True, **kw) -> Scheduler:
    kv = KVManager(BlockPool(blocks), block_size, KVStats(blocks, block_size, sharing),
                   max(r.max_new_tokens for r in requests))
    return Scheduler(requests, batch_size, eos_ids=(0,), max_step_tokens=max_step_tokens, kv=kv, **kw)


def run(scheduler: Scheduler, token=5):
    """Every step's plan until the scheduler is done; each sequence samples `token` (or `token(seq)`) every step."""
    plans, results = [], []
    while (plan := scheduler.next_step()) is not None:
        plans.append(plan)
        results += scheduler.finish_step(plan, [token(s) if callable(token) else token for s in plan.seqs])
    return plans, results


def test_prompts_are_admitted_longest_first_and_ties_keep_dataset_order():
    lengths = [3, 9, 4, 9, 1, 6]
    requests = [Request(list(range(1, n + 1)), max_new_tokens=2, id=f"r{i}") for i, n in enumerate(lengths)]
    plans, results = run(scheduler(requests, batch_size=2, max_step_tokens=64, sharing=False))
    admitted = []  # ids in the order they first appear in a step
    for plan in plans:
        admitted += [seq.result.id for seq in plan.seqs if seq.result.id not in admitted]
    assert admitted == ["r1", "r3", "r5", "r2", "r0", "r4"]
    assert plans[0].q_lens == [9, 9]  # the two longest prompts share the first step
    assert sorted(r.id for r in results) == sorted(r.id for r in requests)  # every request finishes, once
    assert all(len(r.token_ids) == 2 and r.finish_reason == "length" for r in results)


def test_a_step_admits_prompts_while_its_tokens_stay_within_the_cap():
    requests = [Request([7] * n, max_new_tokens=1) for n in (5, 30, 20, 12)]
    plans, _ = run(scheduler(requests, batch_size=8, max_step_tokens=40, sharing=False))
    assert [plan.q_lens for plan in plans] == [[30], [20, 12, 5]]  # 30 + 20 > 40; 20 + 12 + 5 <= 40
    assert [r.request.prompt_ids.count(7) for r in plans[0].seqs] == [30]
