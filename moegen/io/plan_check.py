"""Whether a run goes as its plan said: once a few full decode steps are measured, one that is more than
SAY_OFF off the plan's prediction is said once, with the likely cause and the command that fixes it.

A plan is only as good as the calibration it came from: a model profile measured while other heavy work
ran on the machine (cached, so every later plan inherits it) makes plans too slow; one measured on a
quiet machine that is busy now makes them too fast.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

SAY_OFF = 0.30  # a measured step this far from the prediction (either way) is said
FULL = 0.9  # a decode step of at least this share of the plan's sequences, and no prompts, is a full one
STEPS = 3  # full steps measured before judging (the first ones warm caches and allocators)


class PlanCheck:
    def __init__(self, predicted_step_s: float, sequences: int, model_dir: str, device: str, dtype: str):
        self.predicted_step_s, self.sequences = predicted_step_s, sequences
        self.command = f"moegen calibrate {model_dir} --device {device} --dtype {dtype}"
        self.said = False

    def verdict(self, steps: Sequence[tuple[float, int, int]]) -> str | None:
        """The line to say (once), or None: `steps` are the engine's (seconds, decode sequences, prompt tokens)."""
        if self.said or self.predicted_step_s <= 0:
            return None
        full = [sec for sec, decode, prompt in steps if not prompt and decode >= FULL * self.sequences]
        if len(full) <= STEPS:
            return None
        measured = statistics.median(full[1:])  # the first full step still warms up
        ratio = measured / self.predicted_step_s
        if abs(ratio - 1) <= SAY_OFF:
            return None
        self.said = True
        fix = f"`{self.command}` measures again"
        if ratio < 1:
            return (f"plan off: decode steps take {measured:.3g}s, the plan predicted {self.predicted_step_s:.3g}s "
                    f"({1 / ratio:.1f}x faster): its calibration was likely measured while other work ran on this "
                    f"machine (the cached profile carries that into every plan); {fix}, and later plans follow")
        return (f"plan off: decode steps take {measured:.3g}s, the plan predicted {self.predicted_step_s:.3g}s "
                f"({ratio:.1f}x slower): other work is likely running on this machine now, or the calibration is "
                f"from another setup; the knobs were planned for the predicted speed — {fix} on a quiet machine")
