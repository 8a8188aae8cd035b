"""How a step is cut into attention micro-batches."""

from __future__ import annotations

from moegen.runtime.scheduler import StepPlan
from moegen.runtime.step import micro_batches


def plan(q_lens: list[int]) -> StepPlan:
    past = [0 if q > 1 else 10 for q in q_lens]
    return StepPlan(index=0, seqs=[None] * len(q_lens), rows=list(range(100, 100 + len(q_lens))), past_lens=past,
                    q_lens=q_lens, token_ids=[0] * sum(q_lens))


def test_decode_sequences_and_prompts_never_share_a_micro_batch():
    q_lens = [1, 1, 1, 1, 1, 7, 30, 1, 1, 5]  # decode, then admitted prompts (and a late decode run)
    groups = micro_batches(plan(q_lens), size=4)
    assert [mb.q_lens for mb in groups] == [[1, 1, 1, 1], [1], [7, 30], [1, 1], [5]]
    assert [mb.index for mb in groups] == list(range(len(groups)))
    # Together they cover every sequence and token once, in order.
    assert [r for mb in groups for r in mb.rows] == list(range(100, 110))
    assert [(mb.tokens.start, mb.tokens.stop) for mb in groups] == [(0, 4), (4, 5), (5, 42), (42, 44), (44, 49)]


def test_staged_micro_batches_read_their_staging_rows_as_a_view():
    staged, unstaged = micro_batches(plan([1, 1, 1]), size=8), micro_batches(plan([1, 1, 1]), size=8, staged=False)
    assert staged[0].attn.first_slot == 0 and staged[0].attn.slots.tolist() == [0, 1, 2]
    assert unstaged[0].attn.first_slot == 100 and unstaged[0].attn.slots.tolist() == [100, 101, 102]
    assert micro_batches(plan([1, 1]), size=8, staged=False)[0].rows == [100, 101]


def test_small_cpu_launches_run_on_one_thread_and_restore_the_count():
    import pytest
    import torch

    from moegen.runtime.cpu_threads import SMALL_LAUNCH_BYTES, SMALL_LAUNCH_FLOPS, host_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.zeros(4, 8)
        with host_threads(x, SMALL_LAUNCH_FLOPS / 2, 1000):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with host_threads(x, SMALL_LAUNCH_FLOPS * 2, 1000):
            assert torch.get_num_threads() == 2  # a large launch keeps every thread
        with host_threads(x, 1.0, SMALL_LAUNCH_BYTES * 2):
            assert torch.get_num_threads() == 2  # so does one reading many weights (memory-bound)
        with pytest.raises(RuntimeError), host_threads(x, 1.0, 1000):
            raise RuntimeError("a failing launch")
        assert torch.get_num_threads() == 2  # restored after a failure too
    finally:
        torch.set_num_threads(before)


def test_a_long_prompt_beside_short_ones_pads_at_most_the_step_budget():
    """Prompts of 40, 3, 3, 3, 3 tokens in groups of up to 8: padded to 40 each, four would pass a budget of
    120 tokens, so the group is cut after the third (3 x 40 = 120); decode groups are never cut for it."""
    groups = micro_batches(plan([40, 3, 3, 3, 3]), size=8, max_padded=120)
    assert [mb.q_lens for mb in groups] == [[40, 3, 3], [3, 3]]
    assert all(len(mb.q_lens) * max(mb.q_lens) <= 120 for mb in groups)
    assert [mb.q_lens for mb in micro_batches(plan([1] * 9), size=8, max_padded=4)] == [[1] * 8, [1]]
