"""A layer's expert and MLP outputs added into the step's `out` in one fixed order, whatever order their
launches end in.

Floating-point addition is not associative: the cpu compute stream's lanes end a layer's launches in
an order that changes from run to run, and adding each into `out` as it ends made the same job give
different tokens twice over. In float32 that is a rounding in the last bit; in bfloat16 one rounding
is 2^-8 relative, and two runs of the DeepSeek-V2-Lite-like bench job (64 prompts, 32 new tokens, greedy)
agreed on 30 of 64 completions (after: 256 of 256 at 64 new tokens). So each launch of a layer gets a
rank when it is handed its tokens (the router's order: the MLP first, then the expert groups, then the
resident experts alone, the streamed ones last), and an add that is not yet its turn waits, with its
rows, until every lower rank is in. The result is the sum in rank order, bit for bit from run to run.
(One lane and two are not the same run: the lanes' groups, so the order, differ.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class OrderedAdds:
    """In-place adds applied in rank order; one per step, `reset` at each layer before its launches run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 0  # the rank whose adds run as they come
        self._ended: set[int] = set()
        self._waiting: dict[int, list[Callable[[], object]]] = {}

    def reset(self) -> None:
        with self._lock:
            if self._waiting:
                raise RuntimeError(f"a layer ended with adds of ranks {sorted(self._waiting)} never applied")
            self._next, self._ended = 0, set()

    def turn(self, rank: int) -> Turn:
        return Turn(self, rank)

    def _add(self, rank: int, add: Callable[[], object]) -> None:
        with self._lock:
            if rank == self._next:
                add()
            else:
                self._waiting.setdefault(rank, []).append(add)

    def _end(self, rank: int) -> None:
        with self._lock:
            self._ended.add(rank)
            while self._next in self._ended:
                self._next += 1
                for add in self._waiting.pop(self._next, ()):
                    add()


class Turn:
    """One launch's place in its layer's order: `add` each of its adds (in its own order), then `end`."""

    __slots__ = ("adds", "rank")

    def __init__(self, adds: OrderedAdds | None, rank: int) -> None:
        self.adds, self.rank = adds, rank

    def add(self, add: Callable[[], object]) -> None:
        if self.adds is None:
            with _ALONE:
                add()
        else:
            self.adds._add(self.rank, add)

    def end(self) -> None:
        if self.adds is not None:
            self.adds._end(self.rank)


_ALONE = threading.Lock()
NOW = Turn(None, 0)  # adds applied as they come, one at a time (launches outside a run: the planner's profiles)
