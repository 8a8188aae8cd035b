"""One sequence's KV blocks: which pool blocks hold its tokens, in order, taken as it grows.

Token t of the sequence lives in block `blocks[t // block_size]` at offset `t % block_size`. A prompt's leading
full blocks may be found already computed in the pool (a shared prefix); the rest are taken as the sequence
needs them, and all are released when it finishes or is preempted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moegen.runtime.kv.block_pool import BlockPool


@dataclass(slots=True)
class BlockTable:
    block_size: int  # tokens per block
    blocks: list[int] = field(default_factory=list)  # pool block of each block_size tokens, in order
    shared: int = 0  # leading blocks found computed in the pool (their tokens need no prefill)

    @property
    def capacity(self) -> int:
        """Tokens the blocks held can store."""
        return len(self.blocks) * self.block_size

    def blocks_for(self, tokens: int) -> int:
        """Blocks more it needs to hold `tokens` tokens in all."""
        return max(0, -(-tokens // self.block_size) - len(self.blocks))

    def find_prefix(self, pool: BlockPool, names: list[bytes]) -> int:
        """Before any block is taken: hold the longest run of leading blocks the pool has computed under `names`
        (`prefix.block_names` of the prompt); returns how many (their tokens are cached)."""
        if self.blocks:
            raise ValueError("a sequence's shared prefix is found before it takes any block")
        for name in names:
            block = pool.find(name)
            if block is None:
                break
            self.blocks.append(block)
        self.shared = len(self.blocks)
        return self.shared

    def grow(self, pool: BlockPool, tokens: int) -> None:
        """Hold enough blocks for `tokens` tokens in all (raises OutOfBlocks, holding what it held before). A new
        list when it grows: a step's plan keeps the one it was planned with."""
        more = self.blocks_for(tokens)
        if more:
            self.blocks = self.blocks + pool.take(more)

    def release(self, pool: BlockPool) -> None:
        """Let go of every block (the sequence finished or was preempted)."""
        pool.release(self.blocks)
        self.blocks, self.shared = [], 0
