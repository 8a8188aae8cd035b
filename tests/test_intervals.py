"""Span arithmetic behind busy times and overlap."""

from moegen.intervals import intersect, length, union


def test_union_merges_overlapping_and_touching_spans_and_sorts():
    assert union([(5, 9), (0, 2), (1, 3), (3, 4), (10, 11)]) == [(0, 4), (5, 9), (10, 11)]
    assert union([(0, 10), (2, 3)]) == [(0, 10)]  # one inside another
    assert union([]) == []
    assert length(union([(0, 2), (1, 3), (5, 6)])) == 4


def test_intersect_of_two_unions():
    a, b = union([(0, 4), (6, 10)]), union([(2, 7), (9, 12)])
    assert intersect(a, b) == [(2, 4), (6, 7), (9, 10)]
    assert intersect(a, []) == [] and intersect([(0, 1)], [(1, 2)]) == []  # touching is not overlapping
