"""The parity rule on hand-made logits."""

import torch

from moegen.parity import compare_greedy


def logits(*rows):
    return [torch.tensor(r, dtype=torch.float32) for r in rows]


def test_equal_tokens_pass_and_report_logit_error():
    oracle = logits([10.0, 0.0, -10.0], [0.0, 10.0, 1.0])
    ours = logits([10.0, 0.0, -10.0], [0.0, 10.0, 1.0005])  # 5e-5 of max|logit| = 10
    r = compare_greedy([0, 1], [0, 1], ours, oracle)
    assert r.ok and r.divergence is None and abs(r.max_logit_error - 5e-5) < 1e-6


def test_logits_beyond_tolerance_fail_even_with_equal_tokens():
    oracle = logits([10.0, 0.0, -10.0])
    ours = logits([10.0, 0.002, -10.0])  # 2e-4 of max|logit|
    assert not compare_greedy([0], [0], ours, oracle).ok


def test_divergence_at_a_near_tie_passes_and_is_reported():
    # The oracle's logits for tokens 0 and 1 differ by 5e-5 with max|logit| 10: 5e-6 < 1e-5.
    oracle = logits([1.0, 1.0, -10.0], [10.0, 9.99995, 0.0])
    ours = logits([1.0, 1.0, -10.0], [9.99995, 10.0, 0.0])
    r = compare_greedy([2, 1], [2, 0], ours, oracle)
    assert r.ok and r.divergence == 1 and r.near_tie and "near-tie" in r.detail
    assert abs(r.gap - 5e-6) < 1e-7


def test_divergence_without_a_near_tie_fails():
    oracle = logits([10.0, 9.0, 0.0])
    ours = logits([9.0, 10.0, 0.0])
    r = compare_greedy([1], [0], ours, oracle)
    assert not r.ok and r.divergence == 0 and not r.near_tie and abs(r.gap - 0.1) < 1e-6


def test_different_lengths_with_equal_prefix_fail():
    assert not compare_greedy([4, 5, 6], [4, 5]).ok
