"""moegen on Ray Data: one engine per GPU (per node on CPU-only nodes), the dataset sharded by Ray.

    from moegen.ray import MoegenConfig, build_processor
    processor = build_processor(MoegenConfig(model_dir, engines=4, num_gpus=1))
    results = processor(ray.data.read_json("prompts.jsonl"))   # rows: id, text, finish_reason, ... or id, error

`moegen serve-offline --ray` runs a dataset file this way into one results file (`moegen.ray.job`).
Needs the `ray` extra: pip install 'moegen[ray]'.
"""

from __future__ import annotations

try:
    import ray.data  # noqa: F401
except ImportError as exc:  # say the fix, not just the missing module
    raise ImportError(f"moegen.ray needs Ray Data ({exc}); pip install 'moegen[ray]'") from exc

from moegen.ray.config import MoegenConfig
from moegen.ray.engine import MoegenEngine, engine_map_args
from moegen.ray.processor import Processor, build_processor

__all__ = ["MoegenConfig", "MoegenEngine", "Processor", "build_processor", "engine_map_args"]
