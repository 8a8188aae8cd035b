"""A decode micro-batch's attention cut into shares of its sequences for the cpu lanes."""

from __future__ import annotations

import torch

from moegen.models.batch import AttnBatch
from moegen.runtime.step import MicroBatch
from moegen.runtime.tasks.attention import LANE_SEQUENCES, lane_parts


def micro(past: list[int], q: list[int], first_token: int = 10) -> MicroBatch:
    n = len(q)
    return MicroBatch(0, 0, slice(first_token, first_token + sum(q)), AttnBatch.build(list(range(n)), past, q),
                      past, q)


def test_a_decode_micro_batch_splits_into_consecutive_shares_covering_it_once():
    n = 2 * LANE_SEQUENCES + 1
    past = [5 + i for i in range(n)]
    mb = micro(past, [1] * n)
    parts = lane_parts(mb, 2)
    assert [p[0] for p in parts] == [slice(0, n // 2), slice(n // 2, n)]
    assert [p[1] for p in parts] == [slice(10, 10 + n // 2), slice(10 + n // 2, 10 + n)]
    for seqs, tokens, batch in parts:
        assert batch.first_slot == seqs.start and batch.slots.tolist() == list(range(seqs.start, seqs.stop))
        assert batch.past_lens.tolist() == past[seqs] and batch.max_kv == max(past[seqs]) + 1
        assert batch.positions.tolist() == past[seqs]  # each new token at its sequence's next position


def test_prefill_small_and_single_lane_micro_batches_stay_one_launch():
    n = 2 * LANE_SEQUENCES
    for mb, lanes in ((micro([0] * n, [3] * n), 2), (micro([4] * (n - 1), [1] * (n - 1)), 2),
                      (micro([4] * n, [1] * n), 1)):
        assert [(p[0], p[1]) for p in lane_parts(mb, lanes)] == [(slice(0, len(mb.q_lens)), mb.tokens)]
        assert lane_parts(mb, lanes)[0][2] is mb.attn
    assert torch.equal(lane_parts(micro([4] * n, [1] * n), 2)[1][2].q_lens, torch.ones(LANE_SEQUENCES, dtype=torch.int64))
