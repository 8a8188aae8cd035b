"""Time left of a generation job, from its tokens.

With module batching nearly every request finishes near the end, so finished requests say little
about the time left; tokens do. Each token generated so far ended its sequence early (EOS, a stop
string) with the rate seen, `stops / tokens`; every other sequence runs to its cap. With the engine's
steps in hand (their seconds, decode sequences and prompt tokens), the run ahead is followed step by
step in expectation: each sequence in flight makes a token a step and ends with that chance or at its
cap, waiting requests join as sequences leave, and each step costs what the recent steps cost at its
tokens (a step's time fitted as fixed + per decode token, prompt tokens at the first step's cost each).
So a batch that thins at the end is slower in tokens but not in steps. Without steps (a Ray job),
the expected tokens left over the recent tok/s. Before either, a prior (the plan's job time) gives the
first ETA.

    eta = Eta(requests=256, caps=256 * 64, prompt_tokens=256 * 64, batch=256, prior_s=planned_s)
    eta.observe(now, generated, engine_steps, running_left, running_caps)   # at each progress line
    eta.finished(tokens=12, cap=64)                                         # a request ended
    eta.left(now)                                                           # seconds, or None
"""

from __future__ import annotations

import time
from collections.abc import Sequence

RECENT = 0.5  # the rate and the step times come from this later share of the run since its first token
MIN_STEPS = 4  # ... and no fewer steps than this
MIN_SPAN_S = 1.0  # a token rate is measured over at least this long (steps yield their tokens in bursts)
MAX_STEPS = 100_000  # the run ahead is followed step by step up to this many


class Eta:
    def __init__(self, requests: int, caps: int, prompt_tokens: int = 0, batch: int | None = None,
                 prior_s: float | None = None, fixed: float = 0.5, start: float | None = None):
        self.requests, self.caps, self.prompt_tokens, self.batch, self.prior_s = requests, caps, prompt_tokens, batch, prior_s
        self.fixed = fixed  # where step times can't tell: the share of a step that its tokens don't change
        self.start = time.perf_counter() if start is None else start
        self.done = self.done_tokens = self.done_caps = self.stops = self.generated = 0
        self.steps: Sequence[tuple[float, int, int]] = ()  # per engine step: (seconds, decode sequences, prompt tokens)
        self.running_left: list[int] = []  # tokens of cap left of each sequence in flight
        self.running_caps = 0  # their caps
        self._times: list[float] = []  # (time, generated) each time the token count grew
        self._tokens: list[int] = []

    def finished(self, tokens: int, cap: int) -> None:
        """A request ended with `tokens` generated of its `cap`; fewer than the cap: an early finish."""
        self.done += 1
        self.done_tokens += tokens
        self.done_caps += cap
        self.stops += tokens < cap

    def observe(self, now: float, generated: int, steps: Sequence[tuple[float, int, int]] = (),
                running_left: Sequence[int] = (), running_caps: int = 0) -> None:
        """The job so far: tokens generated (finished requests or not); the engine's steps; the sequences in
        flight, each one's tokens of cap left, and the sum of their caps."""
        self.generated = max(generated, self.done_tokens)
        self.steps, self.running_left, self.running_caps = list(steps), list(running_left), running_caps
        if self.generated and (not self._tokens or self.generated > self._tokens[-1]):
            self._times.append(now)
            self._tokens.append(self.generated)

    @property
    def hazard(self) -> float:
        """The chance that a token ends its sequence early, as seen so far."""
        return self.stops / self.generated if self.generated else 0.0

    def expected_left(self) -> float:
        """Tokens the unfinished requests are expected to generate still."""
        running = self.requests - self.done
        if running <= 0:
            return 0.0
        h, cap_left = self.hazard, max(self.caps - self.done_caps - (self.generated - self.done_tokens), 0)
        return float(cap_left) if h <= 0 else running * (1 - (1 - h) ** (cap_left / running)) / h

    def rate(self, now: float) -> float | None:
        """Generated tok/s over the recent part of the run, or None before it spans MIN_SPAN_S."""
        if len(self._times) < 2:
            return None
        since = max(now - max((now - self._times[0]) * RECENT, MIN_SPAN_S), self._times[0])
        i = max(j for j, t in enumerate(self._times[:-1]) if t <= since)
        span = now - self._times[i]
        return (self._tokens[-1] - self._tokens[i]) / span if span >= MIN_SPAN_S else None

    def left(self, now: float) -> float | None:
        """Seconds left, or None while nothing says."""
        if self.done >= self.requests:
            return 0.0
        decoding = [s for s in self.steps if s[1]]
        if self.batch and len(decoding) >= 2:
            return self._steps_left()
        if (rate := self.rate(now)) and not self.steps:
            return self.expected_left() / rate
        if self.prior_s is not None:
            return max(self.prior_s - (now - self.start), 0.0)
        return None

    def _steps_left(self) -> float:
        """Seconds of the steps left, following the expected batch ahead."""
        prompt_s, step_s = step_costs(self.steps, self.fixed)
        waiting = max(self.requests - self.done - len(self.running_left), 0)
        mean_cap = max(self.caps - self.done_caps - self.running_caps, 0) / waiting if waiting else 0.0
        mean_prompt = max(self.prompt_tokens - sum(s[2] for s in self.steps), 0) / waiting if waiting else 0.0
        cohorts: dict[float, float] = {}  # tokens of cap left -> expected sequences
        for left in self.running_left:
            cohorts[left] = cohorts.get(left, 0.0) + 1.0
        keep, seconds, steps = 1 - self.hazard, 0.0, 0
        while (cohorts or waiting) and steps < MAX_STEPS:
            decode = sum(cohorts.values())
            joined = min(self.batch - decode, waiting) if waiting and self.batch - decode >= 1 else 0
            seconds += step_s(decode) + prompt_s * joined * mean_prompt
            waiting -= joined
            if joined:
                cohorts[mean_cap] = cohorts.get(mean_cap, 0.0) + joined
            steps += 1
            cohorts = {left - 1: n * keep for left, n in cohorts.items() if left > 1 and n * keep >= 1e-3}
        return seconds


def step_costs(steps: Sequence[tuple[float, int, int]], fixed: float):
    """(seconds a prompt token, seconds of a decode step as a function of its sequences) from the steps run:
    a prompt token at what the first step (prompts only) cost each; a step's decode part fitted as a + b * n
    over the recent steps where their sequences differ enough to tell, else their mean split into a `fixed`
    share and one in proportion to n."""
    first = steps[0]
    prompt_s = first[0] / first[2] if first[2] and not first[1] else 0.0
    decoding = [s for s in steps if s[1]]
    recent = decoding[-max(int(len(decoding) * RECENT), MIN_STEPS):]
    xs = [n for _, n, _ in recent]
    ys = [max(sec - prompt_s * p, 0.0) for sec, _, p in recent]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    if max(xs) >= 1.2 * min(xs):
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        if b >= 0 and my - b * mx >= 0:
            return prompt_s, lambda n: my - b * mx + b * n
    return prompt_s, lambda n: my * (fixed + (1 - fixed) * n / mx)


def seconds(s: float) -> str:
    """`7.5s`, `42s`, `3m05s`, `2h07m`: as exact as an ETA deserves."""
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    m = int(round(s)) // 60
    if m < 60:
        return f"{m}m{int(round(s)) % 60:02d}s"
    return f"{m // 60}h{m % 60:02d}m"
