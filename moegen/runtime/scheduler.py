"""Which sequences run each step: up to B in flight, refilled from the waiting prompts while their KV fits.

A step carries one decode token for each running sequence plus the whole prompt (or, past a shared prefix,
its suffix) of each newly admitted one; experts don't care which phase a token is in. The KV side (blocks,
admission reserve, preemption, prefix sharing) is `kv.manager`'s. Host-side bookkeeping only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from moegen.runtime.kv.block_table import BlockTable
from moegen.runtime.kv.manager import DEFERRED, NO_ROOM, KVManager
from moegen.runtime.requests import Request, Result


@dataclass(slots=True, eq=False)
class Sequence:
    request: Request
    table: BlockTable  # its KV blocks
    result: Result
    feed: list[int]  # tokens to run next step: the prompt (or its suffix) first, then the last sampled token
    cached: int = 0  # tokens already in its KV
    names: list[bytes] | None = None  # its prompt's full blocks' prefix names, once asked for


@dataclass(slots=True)
class StepPlan:
    """The sequences of one step, in token order (each sequence's tokens are contiguous)."""

    index: int
    seqs: list[Sequence]
    blocks: list[list[int]]  # KV blocks per sequence, covering its past and new tokens
    past_lens: list[int]  # cached tokens per sequence
    q_lens: list[int]  # new tokens per sequence
    token_ids: list[int]  # all new tokens, flattened

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class Scheduler:
    def __init__(self, requests: list[Request], batch_size: int, eos_ids: tuple[int, ...], max_step_tokens: int,
                 kv: KVManager, detokenize: Callable[[list[int]], str] | None = None,
                 admitting: Callable[[], bool] = lambda: True):
        self.batch_size = batch_size
        self.max_step_tokens = max_step_tokens
        self.kv = kv
        self.detokenize = detokenize  # for stop strings
        self.admitting = admitting  # False once the job drains: no new prompts, the running ones finish
        self.eos_ids = frozenset(eos_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.steps = 0
        self.add(requests)

    def add(self, requests: list[Request]) -> None:
        """Requests to wait behind those already waiting (an engine stream's later arrivals), longest prompts
        first (ties in their order): the prompts admitted into a step are then of similar lengths, and
        attention pads every prompt of a launch to its longest. A request without an id is known by its index."""
        order = sorted(enumerate(requests), key=lambda item: -len(item[1].prompt_ids))
        self.waiting.extend(
            Sequence(r, BlockTable(self.kv.block_size), Result(i if r.id is None else r.id, len(r.prompt_ids)),
                     list(r.prompt_ids)) for i, r in order)

    def next_step(self) -> StepPlan | None:
        """Give the running sequences the blocks their next tokens need (preempting the newest while too few
        are free), admit waiting prompts while their KV and the step's tokens fit, then plan the step; None
        when all is done."""
        if not self.admitting():  # draining: a preempted sequence already has output, and finishes
            self.waiting = deque(s for s in self.waiting if s.result.token_ids)
        self.waiting.extendleft(self.kv.make_room(self.running))
        self._admit()
        if not self.running:
            return None
        plan = StepPlan(
            index=self.steps,
            seqs=list(self.running),
            blocks=[s.table.blocks for s in self.running],
            past_lens=[s.cached for s in self.running],
            q_lens=[len(s.feed) for s in self.running],
            token_ids=[t for s in self.running for t in s.feed],
        )
        self.steps += 1
        return plan

    def _admit(self) -> None:
        """Waiting prompts in order while they fit; one whose shared prefix this step computes waits a step."""
        tokens = sum(len(s.feed) for s in self.running)
        reserve = self.kv.reserve(self.running) if self.waiting else 0
        deferred = []
        while self.waiting and len(self.running) < self.batch_size:
            seq = self.waiting[0]
            verdict = self.kv.try_admit(seq, reserve, self.max_step_tokens - tokens, alone=not self.running)
            if verdict == NO_ROOM:
                break
            self.waiting.popleft()
            if verdict == DEFERRED:
                deferred.append(seq)
                continue
            tokens += len(seq.feed)
            reserve += self.kv.expected_blocks(seq) - len(seq.table.blocks)
            self.running.append(seq)
        self.waiting.extendleft(reversed(deferred))

    def finish_step(self, plan: StepPlan, sampled: list[int]) -> list[Result]:
        """Record each sequence's new token; return the results that finished (their blocks are free again)."""
        self.kv.step_done()
        done = {}
        for seq, token in zip(plan.seqs, sampled):
            seq.cached += len(seq.feed)
            seq.feed = [token]
            result, request = seq.result, seq.request
            result.token_ids.append(token)
            stops = (token in request.stop_token_ids or (not request.ignore_eos and token in self.eos_ids)
                     or self._hit_stop_string(request, result.token_ids))
            if stops:
                result.finish_reason = "stop"
            if stops or len(result.token_ids) >= request.max_new_tokens:
                done[id(seq)] = (seq, False)
            elif self.kv.outgrows(seq):  # alone it would need more blocks than the pool has
                done[id(seq)] = (seq, True)
        if done:
            self.running = [s for s in self.running if id(s) not in done]
        for seq, outgrew in done.values():
            self.kv.finish(seq, outgrew)
        return [seq.result for seq, _ in done.values()]

    def close(self) -> None:
        """The run ended, done or not: every block a sequence still holds goes back to the pool."""
        self.kv.release(self.running + list(self.waiting))
        self.running, self.waiting = [], deque()

    def _hit_stop_string(self, request: Request, tokens: list[int]) -> bool:
        """Whether a stop string ends within the newest token: only the tail is decoded (a stop string
        of n characters spans at most n tokens, plus a few for multi-token characters)."""
        if not request.stop_strings or self.detokenize is None:
            return False
        tail = self.detokenize(tokens[-(max(map(len, request.stop_strings)) + 4):])
        return any(s in tail for s in request.stop_strings)
