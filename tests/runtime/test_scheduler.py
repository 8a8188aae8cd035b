"""Which sequences the scheduler admits into each step, fed synthetic sampled tokens (no model)."""

from __future__ import annotations

from moegen.runtime.requests import Request
from moegen.runtime.scheduler import Scheduler


def run(scheduler: Scheduler, token: int = 5):
    """Every step's plan until the scheduler is done; each sequence samples `token` every step."""
    plans, results = [], []
    while (plan := scheduler.next_step()) is not None:
        plans.append(plan)
        results += scheduler.finish_step(plan, [token] * len(plan.seqs))
    return plans, results


def test_prompts_are_admitted_longest_first_and_ties_keep_dataset_order():
    lengths = [3, 9, 4, 9, 1, 6]
    requests = [Request(list(range(1, n + 1)), max_new_tokens=2, id=f"r{i}") for i, n in enumerate(lengths)]
    plans, results = run(Scheduler(requests, batch_size=2, eos_ids=(0,), max_step_tokens=64))
    admitted = []  # ids in the order they first appear in a step
    for plan in plans:
        admitted += [seq.result.id for seq in plan.seqs if seq.result.id not in admitted]
    assert admitted == ["r1", "r3", "r5", "r2", "r0", "r4"]
    assert plans[0].q_lens == [9, 9]  # the two longest prompts share the first step
    assert sorted(r.id for r in results) == sorted(r.id for r in requests)  # every request finishes, once
    assert all(len(r.token_ids) == 2 and r.finish_reason == "length" for r in results)


def test_a_step_admits_prompts_while_its_tokens_stay_within_the_cap():
    requests = [Request([7] * n, max_new_tokens=1) for n in (5, 30, 20, 12)]
    plans, _ = run(Scheduler(requests, batch_size=8, eos_ids=(0,), max_step_tokens=40))
    assert [plan.q_lens for plan in plans] == [[30], [20, 12, 5]]  # 30 + 20 > 40; 20 + 12 + 5 <= 40
    assert [r.request.prompt_ids.count(7) for r in plans[0].seqs] == [30]
