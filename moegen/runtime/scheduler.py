"""Which sequences run each step: up to B in flight, refilled from the waiting prompts at once.

A step carries one decode token for each running sequence plus the whole prompt of each newly
admitted one; experts don't care which phase a token is in. Host-side bookkeeping only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from moegen.runtime.requests import Request, Result


@dataclass(slots=True)
class Sequence:
    request: Request
    row: int  # its row in the host KV cache
    result: Result
    feed: list[int]  # tokens to run next step: the prompt first, then the last sampled token
    cached: int = 0  # tokens already in its KV


@dataclass(slots=True)
class StepPlan:
    """The sequences of one step, in token order (each sequence's tokens are contiguous)."""

    index: int
    seqs: list[Sequence]
    rows: list[int]  # KV row per sequence
    past_lens: list[int]  # cached tokens per sequence
    q_lens: list[int]  # new tokens per sequence
    token_ids: list[int]  # all new tokens, flattened

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class Scheduler:
    def __init__(self, requests: list[Request], batch_size: int, eos_ids: tuple[int, ...], max_step_tokens: int,
                 detokenize: Callable[[list[int]], str] | None = None, admitting: Callable[[], bool] = lambda: True):
        self.batch_size = batch_size
        self.max_step_tokens = max_step_tokens
        self.detokenize = detokenize  # for stop strings
        self.admitting = admitting  # False once the job drains: no new prompts, the running ones finish
        self.eos_ids = frozenset(eos_ids)
        # Longest prompts first (ties in dataset order): the prompts admitted into a step are then of
        # similar lengths, and attention pads every prompt of a launch to its longest.
        self.waiting: deque[tuple[int, Request]] = deque(sorted(enumerate(requests),
                                                               key=lambda item: -len(item[1].prompt_ids)))
        self.running: list[Sequence] = []
        self.free_rows = list(range(batch_size - 1, -1, -1))
        self.steps = 0

    def next_step(self) -> StepPlan | None:
        """Admit waiting prompts into free rows while the step's tokens stay within max_step_tokens,
        then plan the step; None when all is done."""
        tokens = sum(len(s.feed) for s in self.running)
        if not self.admitting():
            self.waiting.clear()
        while self.waiting and self.free_rows and tokens + len(self.waiting[0][1].prompt_ids) <= self.max_step_tokens:
            index, request = self.waiting.popleft()
            tokens += len(request.prompt_ids)
            rid = index if request.id is None else request.id
            self.running.append(Sequence(request, self.free_rows.pop(), Result(rid, len(request.prompt_ids)),
                                         list(request.prompt_ids)))
        if not self.running:
            return None
        plan = StepPlan(
            index=self.steps,
            seqs=list(self.running),
            rows=[s.row for s in self.running],
            past_lens=[s.cached for s in self.running],
            q_lens=[len(s.feed) for s in self.running],
            token_ids=[t for s in self.running for t in s.feed],
        )
        self.steps += 1
        return plan

    def finish_step(self, plan: StepPlan, sampled: list[int]) -> list[Result]:
        """Record each sequence's new token; return the results that finished (their rows are free again)."""
        done = []
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
                done.append(seq)
        for seq in done:
            self.running.remove(seq)
            self.free_rows.append(seq.row)
        return [seq.result for seq in done]

    def _hit_stop_string(self, request: Request, tokens: list[int]) -> bool:
        """Whether a stop string ends within the newest token: only the tail is decoded (a stop string
        of n characters spans at most n tokens, plus a few for multi-token characters)."""
        if not request.stop_strings or self.detokenize is None:
            return False
        tail = self.detokenize(tokens[-(max(map(len, request.stop_strings)) + 4):])
        return any(s in tail for s in request.stop_strings)
