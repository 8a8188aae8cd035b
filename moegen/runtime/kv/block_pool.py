"""The host KV cache's blocks: which are free, who holds each, and which full prompt blocks are kept for reuse.

A block is one `block_size`-token slice of every layer's KV arena, named by its index. A sequence holds the
blocks its block table lists; a block shared by several sequences (a common prompt prefix) is counted once
per holder. When the last holder lets go, a block that holds a named prefix (`prefix.block_names`) stays
findable by that name but counts as free: it is handed out again, its name dropped, only once the blocks freed
before it are used up (least recently freed first). Single-threaded: the scheduler owns it.
"""

from __future__ import annotations

from collections import OrderedDict


class OutOfBlocks(RuntimeError):
    """Fewer free blocks than asked for: the caller preempts a sequence or waits."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"a KV block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks  # holders of each block
        self.name_of: list[bytes | None] = [None] * num_blocks  # the prefix a block holds, if named
        self._by_name: dict[bytes, int] = {}  # prefix name -> the block that holds it
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # least recently freed first

    @property
    def num_free(self) -> int:
        """Blocks `take` can hand out: unheld ones, named prefix blocks among them."""
        return len(self._free)

    def take(self, n: int) -> list[int]:
        """`n` blocks, each held once; a named block handed out loses its name. Raises OutOfBlocks."""
        if n > len(self._free):
            raise OutOfBlocks(f"{n} KV blocks asked for, {len(self._free)} free of {self.num_blocks}")
        blocks = [self._free.popitem(last=False)[0] for _ in range(n)]
        for b in blocks:
            self._forget(b)
            self.refs[b] = 1
        return blocks

    def peek(self, name: bytes) -> int | None:
        """The block holding the prefix `name`, or None; holds nothing."""
        return self._by_name.get(name)

    def find(self, name: bytes) -> int | None:
        """The block holding the prefix `name`, now held once more (taken back from the free ones if it was
        unheld); None when no block holds it."""
        b = self._by_name.get(name)
        if b is None:
            return None
        if self.refs[b] == 0:
            del self._free[b]
        self.refs[b] += 1
        return b

    def name(self, block: int, name: bytes) -> None:
        """`block` (held) now holds the full prefix block `name`: later prompts may `find` it. A name another
        block already holds keeps that block (two prompts prefilled the same prefix in one step)."""
        if self.refs[block] < 1:
            raise ValueError(f"KV block {block} is not held: only a held block's contents are known")
        if name not in self._by_name and self.name_of[block] is None:
            self._by_name[name] = block
            self.name_of[block] = name

    def release(self, blocks: list[int]) -> None:
        """Each of `blocks` held once less; a block nobody holds is free (still findable if named)."""
        for b in blocks:
            if self.refs[b] < 1:
                raise ValueError(f"KV block {b} released more often than it was held")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self._free[b] = None

    def _forget(self, block: int) -> None:
        name = self.name_of[block]
        if name is not None:
            del self._by_name[name]
            self.name_of[block] = None
