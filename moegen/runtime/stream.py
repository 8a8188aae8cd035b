"""An engine run that takes requests while it runs: several callers, one batch.

    with engine.stream(detokenize) as stream:      # the run starts, idle
        for result in stream.submit(requests):     # from any thread, as many callers as like
            ...                                    # this caller's results, each as it finishes

A caller's requests wait behind those already waiting and join the batch as sequences finish, so
while any caller has work the batch stays full: a caller that is down to its last few sequences
doesn't drain the batch, the others' prompts fill it (Ray Data's engine actors run several batches
at once this way, `moegen.ray`). Each caller gets only its own results; an error in the run reaches
every caller. Closing ends the run once the work submitted is done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from moegen.runtime.requests import Request, Result

if TYPE_CHECKING:
    from moegen.runtime.engine import Engine


class Intake:
    """The run's side (its event loop): what callers submitted, handed to the scheduler."""

    def __init__(self):
        self._queue: asyncio.Queue[list[Request] | None] = asyncio.Queue()
        self._closed = False

    def put(self, requests: list[Request] | None) -> None:
        """On the loop: more requests, or None to close."""
        self._queue.put_nowait(requests)

    def arrived(self) -> list[Request]:
        """Whatever arrived since the last look, without waiting."""
        out: list[Request] = []
        while not self._queue.empty():
            out += self._take(self._queue.get_nowait())
        return out

    async def wait(self) -> list[Request]:
        """The run is idle: the next arrival, or [] once closed and empty."""
        while not self._closed:
            if more := self._take(await self._queue.get()):
                return more + self.arrived()
        return self.arrived()

    def _take(self, item: list[Request] | None) -> list[Request]:
        if item is None:
            self._closed = True
            return []
        return item


class EngineStream:
    """A run on the engine's loop thread that callers feed (`Engine.stream`)."""

    def __init__(self, engine: Engine, detokenize: Callable[[list[int]], str] | None = None):
        self.engine = engine
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._routes: dict[int, tuple[queue.Queue, object]] = {}  # run id -> (its caller's queue, the request's id)
        self._failed: BaseException | None = None
        started: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, args=(detokenize, started), name="moegen-stream",
                                        daemon=True)
        self._thread.start()
        self._loop, self._intake, self._task = started.get()

    def submit(self, requests: Iterable[Request]) -> Iterator[Result]:
        """Run `requests` (each id its caller's own; None: its index here) in the shared batch; yield each
        result as it finishes, until all of them have. They are submitted at once (the iterator only reads);
        what the run can't hold is refused first."""
        requests = list(requests)
        self.engine.check(requests)
        mine: queue.Queue = queue.Queue()
        tagged = []
        with self._lock:
            if self._failed is not None:
                raise self._failed
            for i, r in enumerate(requests):
                run_id = next(self._ids)
                self._routes[run_id] = (mine, i if r.id is None else r.id)
                tagged.append(dataclasses.replace(r, id=run_id))
        try:
            self._loop.call_soon_threadsafe(self._intake.put, tagged)
        except RuntimeError:  # the run just ended: its failure reaches `mine` (the routes were registered)
            pass
        return _results(mine, len(tagged))

    def close(self) -> None:
        """End the run once what was submitted is done (or at once, if it failed); wait for it."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._intake.put, None)
        self._thread.join()

    def cancel(self) -> None:
        """End the run now: callers still waiting get a CancelledError."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join()

    def __enter__(self) -> EngineStream:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.cancel() if exc_type is not None else self.close()

    def _route(self, result: Result) -> None:
        with self._lock:
            mine, rid = self._routes.pop(result.id)
        result.id = rid
        mine.put(result)

    def _serve(self, detokenize, started: queue.Queue) -> None:
        import uvloop

        async def main() -> None:
            intake = Intake()
            started.put((asyncio.get_running_loop(), intake, asyncio.current_task()))
            await self.engine._run([], self._route, detokenize, intake)

        try:
            uvloop.run(main())
            failed: BaseException = RuntimeError("the engine stream closed before these requests finished")
        except BaseException as exc:  # every caller still waiting gets it, traceback intact
            failed = exc
        with self._lock:
            self._failed = failed
            waiting = {id(q): q for q, _ in self._routes.values()}
            self._routes.clear()
        for mine in waiting.values():
            mine.put(failed)


def _results(mine: queue.Queue, count: int) -> Iterator[Result]:
    for _ in range(count):
        item = mine.get()
        if isinstance(item, BaseException):
            raise item
        yield item
