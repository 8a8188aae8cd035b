"""How a step is cut into attention micro-batches."""

from __future__ import annotations

from moegen.runtime.scheduler import StepPlan
from moegen.runtime.step import micro_batches


BLOCK = 16  # tokens per KV block


def plan(q_lens: list[int]) -> StepPlan:
    """Sequence i holds blocks 100 + 3i, 101 + 3i, 102 + 3i (enough for 48 tokens)."""
    past = [0 if q > 1 else 10 for q in q_lens]
    blocks = [[100 + 3 * i + j for j in range(3)] for i in range(len(q_lens))]
    return StepPlan(index=0, seqs=[None] * len(q_lens), blocks=blocks, past_lens=past, q_lens=q_lens,
                    token_ids=[0] * sum(q_lens))


def test_decode_sequences_and_prompts_never_share_a_micro_batch():
    q_lens = [1, 1, 1, 1, 1, 7, 30, 1, 1, 5]  # decode, then admitted prompts (and a late decode run)
    groups = micro_batches(plan(q_lens), size=4, block_size=BLOCK)
    assert [mb.q_lens for mb in groups] == [[1, 1, 1, 1], [1], [7, 30], [1, 1], [5]]
    assert [mb.index for mb in groups] == list(range(len(groups)))
    # Together they cover every sequence and token once, in order.
    assert [row[0] for mb in groups for row in mb.kv_blocks.tolist()] == list(range(100, 130, 3))
    assert [(mb.tokens.start, mb.tokens.stop) for mb in groups] == [(0, 4), (4, 5), (5, 42), (42, 44), (44, 49)]


def test_staged_micro_batches_read_their_staging_rows_as_a_view():
    staged = micro_batches(plan([1, 1, 1]), size=8, block_size=BLOCK)
    unstaged = micro_batches(plan([1, 1, 1]), size=8, block_size=BLOCK, staged=False)
    assert staged[0].attn.first_slot == 0 and staged[0].attn.slots.tolist() == [0, 1, 2]
    assert unstaged[0].attn.slots.tolist() == [100, 103, 106]  # a device cache's rows: each one's first block
    assert unstaged[0].kv_blocks is None


def test_a_staged_micro_batch_gathers_the_blocks_its_contexts_span_and_sends_new_entries_home():
    """Contexts of 11 (10 cached + 1 new) and 17 tokens (16 + 1) in blocks of 16: both rows gather two blocks
    (the longest spans two), the first holding one block only, so its second entry names block 0 (masked); the
    new tokens at positions 10 and 16 go to offset 10 of block 100 and offset 0 of block 104."""
    p = plan([1, 1])
    p.past_lens, p.blocks[0] = [10, 16], [100]
    (mb,) = micro_batches(p, size=8, block_size=BLOCK)
    assert mb.kv_blocks.tolist() == [[100, 0], [103, 104]]
    assert mb.kv_slots.tolist() == [100 * BLOCK + 10, 104 * BLOCK + 0]
    p.past_lens = [3, 4]
    (mb,) = micro_batches(p, size=8, block_size=BLOCK)
    assert mb.kv_blocks.tolist() == [[100], [103]]


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
    groups = micro_batches(plan([40, 3, 3, 3, 3]), size=8, block_size=BLOCK, max_padded=120)
    assert [mb.q_lens for mb in groups] == [[40, 3, 3], [3, 3]]
    assert all(len(mb.q_lens) * max(mb.q_lens) <= 120 for mb in groups)
    assert [mb.q_lens for mb in micro_batches(plan([1] * 9), size=8, block_size=BLOCK, max_padded=4)] == [[1] * 8, [1]]
