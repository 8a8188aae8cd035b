"""The scheduler's KV side: admission against the free blocks and a reserve for expected growth, blocks taken
as sequences grow, preemption when they run out, and shared prompt prefixes found, computed once and named.

Admission: a prompt joins when the blocks its tokens need, plus the growth every running sequence and it are
expected to still make, are free: up to each row's cap where rows carry different caps (the workload says what
it expects), else from the output lengths seen so far (`lengths.OutputLengths`). Growth past the expectation is met by preemption:
before a step, each running sequence (oldest first) takes the blocks its next tokens need; when too few are
free the most recently admitted sequence lets go of all of its own and goes back to wait, to recompute its
prompt and the tokens it produced when it is admitted again (its output is the same: sampling is counted per
request). A sequence that alone would outgrow the whole pool finishes as "length" instead (`outgrows`).

Prefix sharing: a prompt's leading full blocks that the pool holds under their names (`prefix.block_names`)
are held again instead of recomputed; at least its last token is always computed (its logits give the first
output). A prompt whose next leading block is being computed in this very step waits for the next step, then
prefills only its suffix. The blocks a step computes are named when it finishes (their KV is home by the
time a later step reads it: each layer's staging waits for the previous step's write-backs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from moegen.runtime.kv.block_pool import BlockPool
from moegen.runtime.kv.lengths import OutputLengths
from moegen.runtime.kv.prefix import block_names

if TYPE_CHECKING:
    from moegen.runtime.scheduler import Sequence

ADMITTED, DEFERRED, NO_ROOM = "admitted", "deferred", "no room"


@dataclass(slots=True)
class KVStats:
    """What the KV cache did over a run (`EngineStats.kv`; serve's stats JSON)."""

    blocks: int  # in the pool
    block_size: int  # tokens per block
    prefix_sharing: bool
    prefill_tokens: int = 0  # prompt tokens computed (recomputed ones included, shared prefix tokens not)
    prefix_hit_tokens: int = 0  # prompt tokens found already computed in shared prefix blocks
    preemptions: int = 0  # sequences sent back to wait because blocks ran out
    recomputed_tokens: int = 0  # tokens computed again after a preemption
    outgrew_pool: int = 0  # sequences that finished as "length" because the whole pool could not hold more
    peak_blocks_held: int = 0  # most blocks held at once by sequences in flight

    @property
    def prefix_hit_rate(self) -> float:
        """Share of prompt tokens (computed or found) that a shared prefix block held."""
        seen = self.prefill_tokens - self.recomputed_tokens + self.prefix_hit_tokens
        return self.prefix_hit_tokens / seen if seen else 0.0


class KVManager:
    def __init__(self, pool: BlockPool, block_size: int, stats: KVStats, max_output: int, adaptive: bool = True):
        """One run's: the pool (and its cached prefix blocks) and `stats` outlive it; the output lengths it
        expects from are this run's (of at most `max_output` tokens). `adaptive`: expect from the lengths seen
        (every row has the same cap); else each row's own cap is what the workload expects of it."""
        self.pool, self.block_size, self.sharing, self.stats = pool, block_size, stats.prefix_sharing, stats
        self.lengths = OutputLengths(max_output)
        self.adaptive = adaptive
        self._computing: dict[bytes, tuple[Sequence, int]] = {}  # name -> (sequence, block index) of this step

    @property
    def capacity_tokens(self) -> int:
        """Tokens the whole pool holds: no sequence may hold more."""
        return self.pool.num_blocks * self.block_size

    def expected_blocks(self, seq: Sequence) -> int:
        """Blocks `seq` is expected to hold at its end (prompt + expected output; what it holds now at least)."""
        r = seq.request
        output = self.lengths.expected(len(seq.result.token_ids), r.max_new_tokens) if self.adaptive else r.max_new_tokens
        tokens = len(r.prompt_ids) + output - 1
        return max(len(seq.table.blocks), -(-tokens // self.block_size))

    def reserve(self, running: list[Sequence]) -> int:
        """Blocks the running sequences are expected to take yet."""
        return sum(self.expected_blocks(s) - len(s.table.blocks) for s in running)

    def try_admit(self, seq: Sequence, reserve: int, token_room: int, alone: bool) -> str:
        """Admit `seq` (its feed: the prompt, or prompt + output after a preemption) if its blocks and `reserve`
        plus its own expected growth are free (`alone`: nothing runs, so only its blocks must be) and its new
        tokens fit `token_room`. Found prefix blocks shorten its feed."""
        names = self._findable(seq)
        found = []
        for name in names:
            block = self.pool.peek(name)
            if block is None:
                if name in self._computing:
                    return DEFERRED
                break
            found.append(block)
        hit = len(found) * self.block_size
        if len(seq.feed) - hit > token_room:
            return NO_ROOM
        total = len(seq.feed) + seq.cached
        take = -(-total // self.block_size) - len(found)
        unheld = sum(1 for b in found if self.pool.refs[b] == 0)  # found among the free: no longer free
        growth = max(0, self.expected_blocks(seq) - take - len(found))
        if take + unheld + (0 if alone else reserve + growth) > self.pool.num_free:
            return NO_ROOM
        seq.table.find_prefix(self.pool, names[: len(found)])
        seq.table.grow(self.pool, total)
        recompute = len(seq.result.token_ids) > 0
        seq.cached, seq.feed = hit, seq.feed[hit:]
        self.stats.prefix_hit_tokens += 0 if recompute else hit
        self.stats.prefill_tokens += len(seq.feed)
        self.stats.recomputed_tokens += len(seq.feed) - 1 if recompute else 0
        if self.sharing:
            for i in range(len(found), len(seq.names)):  # the full prompt blocks this step computes
                self._computing.setdefault(seq.names[i], (seq, i))
        return ADMITTED

    def make_room(self, running: list[Sequence]) -> list[Sequence]:
        """Before a step: each running sequence, oldest first, takes the blocks its feed needs, preempting the
        most recently admitted ones while too few are free. Returns those preempted (newest first), their blocks
        released and their feed the whole prompt + output to recompute; `running` loses them."""
        preempted, i = [], 0
        while i < len(running):
            seq = running[i]
            need = seq.table.blocks_for(seq.cached + len(seq.feed))
            while need > self.pool.num_free and running[-1] is not seq:
                preempted.append(self._preempt(running.pop()))
            if need > self.pool.num_free:  # the newest itself: what runs before it keeps its blocks
                preempted.append(self._preempt(running.pop()))
                break
            seq.table.grow(self.pool, seq.cached + len(seq.feed))
            i += 1
        held = self.pool.num_blocks - self.pool.num_free
        self.stats.peak_blocks_held = max(self.stats.peak_blocks_held, held)
        return preempted

    def outgrows(self, seq: Sequence) -> bool:
        """Whether `seq`'s next token would not fit even if it held the whole pool."""
        return seq.cached + len(seq.feed) > self.capacity_tokens

    def step_done(self) -> None:
        """The step's prefill finished: the full prompt blocks it computed are findable by name."""
        for name, (seq, i) in self._computing.items():
            if i < len(seq.table.blocks):
                self.pool.name(seq.table.blocks[i], name)
        self._computing.clear()

    def finish(self, seq: Sequence, outgrew: bool) -> None:
        """`seq` is done: its output length counts toward the expectation; its blocks are free."""
        self.lengths.record(len(seq.result.token_ids))
        self.stats.outgrew_pool += outgrew
        seq.table.release(self.pool)

    def release(self, seqs: list[Sequence]) -> None:
        """A run ended early (cancelled, or an error): every block its sequences held is free again."""
        for seq in seqs:
            if seq.table.blocks:
                seq.table.release(self.pool)
        self._computing.clear()

    def _findable(self, seq: Sequence) -> list[bytes]:
        """The names of the prompt's leading full blocks another prompt may already have computed: never the
        block of the feed's last token, which must be computed for its logits."""
        if not self.sharing:
            return []
        if seq.names is None:
            seq.names = block_names(seq.request.prompt_ids, self.block_size)
        return seq.names[: (seq.cached + len(seq.feed) - 1) // self.block_size]

    def _preempt(self, seq: Sequence) -> Sequence:
        self.stats.preemptions += 1
        seq.table.release(self.pool)
        seq.cached, seq.feed = 0, list(seq.request.prompt_ids) + seq.result.token_ids
        return seq
