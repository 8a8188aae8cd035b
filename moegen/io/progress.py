"""Progress of a long job: a bar on a terminal, plain periodic lines otherwise (logs, CI).

A ticker thread refreshes it even when no request finishes (with module batching nearly every
result comes at the end), so the ETA comes from tokens (`io.eta`), not finished requests, and the
first line already has one (the plan's prediction, before steps are measured). The line shows the
sequences in flight and, where weights stream over the link, how busy the link was since the last
line; once a few full steps are measured, a plan that is well off is said once (`io.plan_check`).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from moegen.io.eta import Eta, seconds
from moegen.io.plan_check import PlanCheck

PLAIN_EVERY_S = 10.0  # plain lines
BAR_EVERY_S = 1.0  # the bar's numbers


@dataclass(slots=True)
class Live:
    """The engine as it runs, read from the ticker's thread."""

    generated: int  # tokens sampled so far
    steps: list = field(default_factory=list)  # per step: (seconds, decode sequences, prompt tokens)
    running: tuple = ((), 0)  # tokens of cap left of each sequence in flight, and their caps
    link_busy_s: float | None = None  # seconds the link has been busy so far; None: no weights stream


class Progress:
    """Requests done / total, sequences in flight, generated tokens/s, link busy, ETA."""

    def __init__(self, total: int, stream=None, live: Callable[[], Live] | None = None, eta: Eta | None = None,
                 check: PlanCheck | None = None):
        self.total, self.stream = total, stream or sys.stderr  # looked up now: callers may redirect stderr
        self.live, self.check = live, check
        self.eta = eta if eta is not None else Eta(total, 0)
        self.done = self.tokens = 0
        self.start = self.eta.start = time.perf_counter()
        self._link = (self.start, 0.0)  # (when, busy seconds) at the last line
        self._lock = threading.RLock()  # re-entrant: a signal handler may print while update() holds it
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="req", file=stream, dynamic_ncols=True)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="moegen-progress", daemon=True)
        self._ticker.start()

    def update(self, generated_tokens: int, cap: int | None = None) -> None:
        """One request finished with `generated_tokens` tokens of its `cap` (max new tokens)."""
        with self._lock:
            self.done += 1
            self.tokens += generated_tokens
            self.eta.finished(generated_tokens, generated_tokens if cap is None else cap)
            if self._bar is not None:
                self._bar.update(1)
        if self.done == self.total:
            self._refresh()

    def _tick(self) -> None:
        self._refresh()  # the first line at once: it has the plan's ETA
        while not self._stop.wait(BAR_EVERY_S if self._bar is not None else PLAIN_EVERY_S):
            self._refresh()

    def _refresh(self) -> None:
        with self._lock:
            text = self.line()
            warning = self.check.verdict(self.eta.steps) if self.check is not None else None
            if self._bar is not None:
                self._bar.set_postfix_str(text.split(" requests, ", 1)[-1])
            else:
                self.say(text)
            if warning:
                self.say(warning)

    def generated(self) -> int:
        return self.live().generated if self.live is not None else self.tokens

    def rate(self) -> float:
        return self.generated() / max(time.perf_counter() - self.start, 1e-9)

    def line(self) -> str:
        now = time.perf_counter()
        parts = [f"{self.done}/{self.total} requests"]
        live = self.live() if self.live is not None else None
        if live is not None:
            self.eta.observe(now, live.generated, live.steps, *live.running)
            parts.append(f"{len(live.running[0])} in flight")
        else:
            self.eta.observe(now, self.tokens)
        parts.append(f"{self.eta.generated / max(now - self.start, 1e-9):.1f} generated tok/s")
        if live is not None and live.link_busy_s is not None:
            (then, busy), self._link = self._link, (now, live.link_busy_s)
            parts.append(f"link busy {min((live.link_busy_s - busy) / max(now - then, 1e-9), 1.0):.0%}")
        left = self.eta.left(now)
        parts.append(f"{now - self.start:.0f}s elapsed")
        parts.append(f"ETA {seconds(left)}" if left is not None else "ETA after the first steps")
        return ", ".join(parts)

    def say(self, message: str) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.write(f"moegen: {message}", file=self.stream)
            else:
                print(f"moegen: {message}", file=self.stream, flush=True)

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()
        if self._bar is not None:
            self._bar.close()
