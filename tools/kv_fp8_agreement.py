"""--kv-dtype fp8 against the run dtype's KV: how many greedy completions are equal, per bench checkpoint.

    python -m tools.kv_fp8_agreement [MODEL_DIR ...] [--prompts 64] [--new-tokens 32] [--dtype float32]

Without MODEL_DIR, the bench checkpoints (mixtral-like and deepseek-v2-like, random weights; made once into the
cache as `moegen bench` makes them). Each checkpoint runs the same prompts in one engine configuration,
--kv-dtype auto then fp8, and prints the completions equal token for token, the tokens before the first
divergence, and each run's generated tok/s. The peer beside it: the same count for a run in bfloat16 against
float32 (a rounding of 2^-9 everywhere, which parity tests accept), so a low count can be told from random
weights' near-tied logits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dirs", nargs="*", type=Path)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    from moegen.checkpoints.demo import cached_checkpoint

    dirs = args.model_dirs or [cached_checkpoint(f, "bench", "bench") for f in ("mixtral", "deepseek_v2")]
    for model_dir in dirs:
        agreement(model_dir, args.prompts, args.new_tokens, args.dtype)


def agreement(model_dir: Path, n: int, new_tokens: int, dtype: str) -> None:
    from moegen.bench.vs_transformers import bench_prompts
    from moegen.generate import load_tokenizer
    from moegen.models.hf_config import generation_eos_ids, load_model_config
    from moegen.models.loader import load_checkpoint
    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request

    tokenizer = load_tokenizer(model_dir)
    prompts = [tokenizer(text)["input_ids"] for text in bench_prompts(tokenizer, n)]
    eos = generation_eos_ids(model_dir, load_model_config(model_dir))
    runs, speed = {}, {}
    for run_dtype, kv_dtype in ((dtype, "auto"), (dtype, "fp8"), ("bfloat16", "auto")):
        rcfg = RuntimeConfig(dtype=run_dtype, kv_dtype=kv_dtype, max_seq_len=max(map(len, prompts)) + new_tokens)
        cfg, weights, _ = load_checkpoint(model_dir, rcfg.torch_dtype)
        with Engine(cfg, weights, rcfg, eos) as engine:
            start = time.perf_counter()
            results = list(engine.generate([Request(p, new_tokens) for p in prompts]))
            seconds = time.perf_counter() - start
        runs[run_dtype, kv_dtype] = [r.token_ids for r in sorted(results, key=lambda r: r.id)]
        speed[run_dtype, kv_dtype] = sum(len(r.token_ids) for r in results) / seconds
    base = runs[dtype, "auto"]
    print(f"{model_dir.name}: {_agree(runs[dtype, 'fp8'], base)} with --kv-dtype fp8 vs auto ({dtype}); peer: "
          f"{_agree(runs['bfloat16', 'auto'], base)} with --dtype bfloat16 vs {dtype}; generated tok/s auto "
          f"{speed[dtype, 'auto']:.0f}, fp8 {speed[dtype, 'fp8']:.0f}", flush=True)


def _agree(ours: list[list[int]], base: list[list[int]]) -> str:
    """Completions equal token for token, and tokens before each one's first divergence."""
    equal = sum(a == b for a, b in zip(ours, base))
    before = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                 for a, b in zip(ours, base))
    return (f"{equal}/{len(base)} greedy completions equal, {before}/{sum(map(len, base))} tokens before the "
            "first divergence")


if __name__ == "__main__":
    main()
