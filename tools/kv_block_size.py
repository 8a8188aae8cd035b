"""The paged KV cache's block size, measured: decode tok/s of one job at several --kv-block-size values, side by
side, staged onto a (simulated) device and read in place, and the KV memory a partial last block wastes.

    python -m tools.kv_block_size [MODEL_DIR] [--requests 128] [--prompt-len 96] [--new-tokens 32] [--repeats 2]

Runs alternate block sizes within each repeat (noise hits them all); prints the best of each. The job's prompts
are distinct (no prefix is shared), every sequence decodes to its cap (ignore_eos).
"""

from __future__ import annotations

import argparse
import time

SIZES = (4, 8, 16, 32, 64, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default=None, help="[default: the bench Mixtral-like checkpoint]")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from moegen.checkpoints.demo import cached_checkpoint
    from moegen.models.hf_config import generation_eos_ids
    from moegen.models.loader import load_checkpoint
    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request

    model_dir = args.model_dir or cached_checkpoint("mixtral", "bench", "bench")
    cfg, weights, _ = load_checkpoint(model_dir)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist() for _ in range(args.requests)]
    requests = [Request(p, args.new_tokens, ignore_eos=True) for p in prompts]
    eos = generation_eos_ids(model_dir, cfg)
    seq = args.prompt_len + args.new_tokens
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.repeats):
        for where, budget in (("staged", 2**40), ("in place", None)):
            for size in SIZES:
                rcfg = RuntimeConfig(batch_size=args.requests, max_seq_len=seq, kv_block_size=size, gpu_memory=budget,
                                     prefix_sharing=False)
                with Engine(cfg, weights, rcfg, eos) as engine:
                    began = time.perf_counter()
                    list(engine.generate(requests))
                    took = time.perf_counter() - began
                tok_s = args.requests * args.new_tokens / took
                best[where, size] = max(best.get((where, size), 0.0), tok_s)
    print(f"{model_dir}: {args.requests} sequences of {args.prompt_len} prompt + {args.new_tokens} new tokens, "
          f"best of {args.repeats}")
    print("block  staged tok/s  in-place tok/s  KV held but unused (mean over a sequence's life)")
    context = args.prompt_len + args.new_tokens / 2  # tokens a sequence holds, on average over its life
    for size in SIZES:
        waste = (size - 1) / 2 / (context + (size - 1) / 2)  # its last block is half empty, on average
        print(f"{size:5d}  {best['staged', size]:12.1f}  {best['in place', size]:14.1f}  {waste:.1%}")


if __name__ == "__main__":
    main()
