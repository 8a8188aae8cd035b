"""How long a running sequence's output is expected to get, from the lengths finished ones reached.

Admission reserves blocks for what each running sequence is expected to hold, not its worst case: a
sequence that has produced n tokens is expected to end at the mean length of the finished outputs longer
than n (the long tail stays long), at most its own cap; with no such output seen yet, at its cap. So a
job starts out reserving every row's cap (today's row reservation) and loosens as outputs end early.
"""

from __future__ import annotations


class OutputLengths:
    """Finished output lengths in 1..max_len, counted in two Fenwick trees (how many, and their sum) so
    `expected` is O(log max_len)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self._count = [0] * (max_len + 1)  # Fenwick tree over lengths 1..max_len
        self._sum = [0] * (max_len + 1)
        self.total = 0  # outputs recorded
        self.total_tokens = 0  # their lengths summed

    def record(self, length: int) -> None:
        """A finished output of `length` tokens (clipped to 1..max_len)."""
        length = min(max(length, 1), self.max_len)
        self.total += 1
        self.total_tokens += length
        i = length
        while i <= self.max_len:
            self._count[i] += 1
            self._sum[i] += length
            i += i & -i

    def expected(self, produced: int, cap: int) -> int:
        """The total output tokens expected of a sequence that has produced `produced` of at most `cap`."""
        n_le, s_le = self._prefix(min(produced, self.max_len))
        longer = self.total - n_le
        if longer == 0:
            return cap
        mean = -(-(self.total_tokens - s_le) // longer)  # rounded up
        return max(produced + 1, min(cap, mean))

    def _prefix(self, length: int) -> tuple[int, int]:
        """(count, sum) of the recorded lengths <= `length`."""
        n = s = 0
        i = length
        while i > 0:
            n += self._count[i]
            s += self._sum[i]
            i -= i & -i
        return n, s
