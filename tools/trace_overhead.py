"""Tracing overhead: generated tokens/s of the same job with and without --trace, side by side.

    python -m tools.trace_overhead MODEL_DIR [--prompts 64] [--new-tokens 32] [--repeats 2] [--trace-out run.pftrace]

Runs alternate (off, on, off, on, ...) in one process so machine noise hits both; prints the
best of each and the ratio. The traced run's file is kept at --trace-out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trace-out", default="/tmp/moegen-overhead.pftrace")
    args = parser.parse_args()

    from moegen.generate import load_tokenizer
    from moegen.models.hf_config import generation_eos_ids
    from moegen.models.loader import load_checkpoint
    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request
    from moegen.bench.vs_transformers import bench_prompts

    tokenizer = load_tokenizer(args.model_dir)
    prompts = [tokenizer(text)["input_ids"] for text in bench_prompts(tokenizer, args.prompts)]
    cfg, weights, _ = load_checkpoint(args.model_dir)
    rcfg = RuntimeConfig(max_seq_len=max(map(len, prompts)) + args.new_tokens)
    eos = generation_eos_ids(args.model_dir, cfg)
    best = {"off": 0.0, "on": 0.0}
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            trace = Path(args.trace_out) if mode == "on" else None
            with Engine(cfg, weights, rcfg, eos, trace=trace) as engine:
                start = time.perf_counter()
                n = sum(len(r.token_ids) for r in engine.generate(
                    [Request(p, args.new_tokens, ignore_eos=True) for p in prompts]))
                best[mode] = max(best[mode], n / (time.perf_counter() - start))
    size = Path(args.trace_out).stat().st_size
    print(f"{'tracing':<10}{'generated tok/s (best of ' + str(args.repeats) + ')':>32}")
    print(f"{'off':<10}{best['off']:>32.1f}")
    print(f"{'on':<10}{best['on']:>32.1f}")
    print(f"traced / untraced: {best['on'] / best['off']:.3f} ({(1 - best['on'] / best['off']) * 100:.1f}% slower); "
          f"trace file {size / 2**20:.1f} MiB at {args.trace_out}")


if __name__ == "__main__":
    main()
