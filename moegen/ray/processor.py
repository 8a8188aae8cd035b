"""`build_processor`: moegen in the shape of `ray.data.llm`'s processors.

    processor = build_processor(config, preprocess=lambda row: {"id": row["uid"], "prompt": row["q"]},
                                postprocess=lambda row: {"uid": row["id"], "answer": row["text"]})
    out = processor(ds)

`preprocess` maps each input row to a moegen row (an id, a prompt or messages, per-row sampling fields
such as max_tokens and temperature); the engines map those to output rows (id, text, finish_reason,
prompt_tokens, completion_tokens, error, and the record serve-offline would write); `postprocess` maps
each output row to what you keep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moegen.ray.config import MoegenConfig
from moegen.ray.engine import MoegenEngine, engine_map_args


@dataclass(frozen=True, slots=True)
class Processor:
    config: MoegenConfig
    preprocess: Callable[[dict], dict] | None = None
    postprocess: Callable[[dict], dict] | None = None

    def __call__(self, dataset):
        """The lazy Dataset of `dataset`'s results (Ray runs it when it is consumed)."""
        if self.preprocess is not None:
            dataset = dataset.map(self.preprocess)
        dataset = dataset.map_batches(MoegenEngine, fn_constructor_args=(self.config,), **engine_map_args(self.config))
        if self.postprocess is not None:
            dataset = dataset.map(self.postprocess)
        return dataset


def build_processor(config: MoegenConfig, preprocess: Callable[[dict], dict] | None = None,
                    postprocess: Callable[[dict], dict] | None = None) -> Processor:
    return Processor(config, preprocess, postprocess)
