"""Progress of a long job: a bar on a terminal, plain periodic lines otherwise (logs, CI).

A ticker thread refreshes it every few seconds even when no request finishes (with continuous
batching, the first results only come after a whole completion's worth of steps).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

PLAIN_EVERY_S = 10.0  # plain lines
BAR_EVERY_S = 1.0  # tok/s on the bar


class Progress:
    """Requests done / total, generated tokens/s, ETA."""

    def __init__(self, total: int, stream=None, live_tokens: Callable[[], int] | None = None):
        self.total, self.stream = total, stream or sys.stderr  # looked up now: callers may redirect stderr
        self.live_tokens = live_tokens  # () -> tokens generated so far, finished requests or not
        self.done = self.tokens = 0
        self.start = time.perf_counter()
        self._lock = threading.RLock()  # re-entrant: a signal handler may print while update() holds it
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="req", file=stream, dynamic_ncols=True)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="moegen-progress", daemon=True)
        self._ticker.start()

    def update(self, generated_tokens: int) -> None:
        """One request finished with `generated_tokens` tokens."""
        with self._lock:
            self.done += 1
            self.tokens += generated_tokens
            if self._bar is not None:
                self._bar.update(1)
        if self.done == self.total:
            self._refresh()

    def _tick(self) -> None:
        while not self._stop.wait(BAR_EVERY_S if self._bar is not None else PLAIN_EVERY_S):
            self._refresh()

    def _refresh(self) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.set_postfix_str(f"{self.rate():.1f} generated tok/s")
        else:
            self.say(self.line())

    def generated(self) -> int:
        return self.live_tokens() if self.live_tokens is not None else self.tokens

    def rate(self) -> float:
        return self.generated() / max(time.perf_counter() - self.start, 1e-9)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        eta = f"ETA {(self.total - self.done) * elapsed / self.done:.0f}s" if self.done else "ETA after the first results"
        return f"{self.done}/{self.total} requests, {self.rate():.1f} generated tok/s, {elapsed:.0f}s elapsed, {eta}"

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
