"""Progress of a long job: a bar on a terminal, plain periodic lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time

PLAIN_EVERY_S = 10.0


class Progress:
    """Requests done / total, generated tokens/s, ETA."""

    def __init__(self, total: int, stream=sys.stderr, live_tokens=None):
        self.total, self.stream = total, stream
        self.live_tokens = live_tokens  # () -> tokens generated so far, finished requests or not
        self.done = self.tokens = 0
        self.start = self._last = time.perf_counter()
        self._bar = None
        if stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="req", file=stream, dynamic_ncols=True)

    def update(self, generated_tokens: int) -> None:
        self.done += 1
        self.tokens += generated_tokens
        rate = self.generated() / max(time.perf_counter() - self.start, 1e-9)
        if self._bar is not None:
            self._bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
            self._bar.update(1)
        elif time.perf_counter() - self._last >= PLAIN_EVERY_S or self.done == self.total:
            self._last = time.perf_counter()
            self.say(self.line())

    def generated(self) -> int:
        return self.live_tokens() if self.live_tokens is not None else self.tokens

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.generated() / max(elapsed, 1e-9)
        eta = (self.total - self.done) * elapsed / self.done if self.done else float("nan")
        return f"{self.done}/{self.total} requests, {rate:.1f} generated tok/s, {elapsed:.0f}s elapsed, ETA {eta:.0f}s"

    def say(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(f"moegen: {message}", file=self.stream)
        else:
            print(f"moegen: {message}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
