"""How steady the machine was while calibration measured it, and whether that is steady enough to cache.

Every measurement repeats and keeps its best repeat; how far its repeats disagree (their median over
their best) says whether something else was running. A calibration is cached for every later plan on
the machine, so one made while other heavy work ran would mislead them all: a result whose
measurements disagreed by more than MAX_SPREAD, typically, is used for this run only and not cached.
The machine's load while it ran (the 1-minute load average per core) is recorded beside it.

    with measuring() as steadiness:
        machine = measure_machine(device)
    if not steadiness.steady: say(steadiness.note("the machine's calibration"))
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

MAX_SPREAD = 0.25  # the typical (median) measurement's repeats may disagree by this much for it to be cached

_collecting: list[list[float]] = []  # the spreads of each `measuring` block open now (they may nest)


@dataclass(slots=True)
class Steadiness:
    spread: float = 0.0  # the median over its measurements of (median repeat / best repeat - 1)
    load: float = 0.0  # the 1-minute load average per core, the larger of before and after
    measurements: int = 0

    @property
    def steady(self) -> bool:
        return self.spread <= MAX_SPREAD

    def note(self, what: str) -> str:
        return (f"{what} is not cached: its measurements' repeats disagreed by {self.spread:.0%} (the typical one "
                f"of {self.measurements}), more than the {MAX_SPREAD:.0%} allowed; the load was {self.load:.2f} per "
                "core while it ran, so other work was likely running. This run plans with it; run `moegen "
                "calibrate` when the machine is quiet to cache one")


def record(times: list[float]) -> None:
    """One measurement's repeats, seconds each."""
    best = min(times)
    spread = statistics.median(times) / best - 1 if best > 0 else 0.0
    for spreads in _collecting:
        spreads.append(spread)


@contextmanager
def measuring() -> Iterator[Steadiness]:
    """The steadiness of the measurements made inside (filled in at the end of the block)."""
    found, spreads, before = Steadiness(), [], _load()
    _collecting.append(spreads)
    try:
        yield found
    finally:
        _collecting.remove(spreads)
        found.spread = statistics.median(spreads) if spreads else 0.0
        found.load, found.measurements = max(before, _load()), len(spreads)


def _load() -> float:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0
