"""`moegen bench`: throughput measured side by side in one run, against what is possible.

- `vs_transformers`: moegen's `serve-offline` (no knobs, timed from process start) against
  transformers `generate` on the same checkpoints, prompts and token counts, on one device.
- `offload`: module-based against model-based batching under the same device budget and
  simulated link (cpu backend), in the regime module batching exists for.
- `paged_kv`: the paged host KV cache against today's row reservation under one host KV budget, and
  prefix sharing on and off (`--scenario paged-kv`, alone).
"""
