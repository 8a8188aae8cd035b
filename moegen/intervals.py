"""[start, end) time spans: their union, total length and intersection (the cpu stream's busy time
across lanes, and the trace summary's busy fractions and overlap)."""

from __future__ import annotations

from collections.abc import Iterable

Span = tuple[float, float]  # [start, end), in any one unit


def union(spans: Iterable[Span]) -> list[Span]:
    """The spans merged where they overlap or touch, sorted."""
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(spans: Iterable[Span]) -> float:
    return sum(end - start for start, end in spans)


def intersect(a: list[Span], b: list[Span]) -> list[Span]:
    """Where two sorted, disjoint lists of spans (as `union` gives) overlap."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out
