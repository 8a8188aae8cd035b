"""Host attention's share, measured: per decode step, the KV bytes staged onto the (simulated) device and the
bytes that cross for the host-attended sequences, and decode tok/s, at several --cpu-attention shares side by
side, in the offload regime (a device budget and a simulated link).

    python -m tools.host_attention_share [MODEL_DIR] [--requests 64] [--prompt-len 256] [--new-tokens 16]
        [--shares 0,0.5,1] [--link-gbps 2.0] [--budget-share 0.6]

On the cpu backend host and "device" share the same cores, so tok/s here says little about a GPU's; the bytes
are exact. Numbers come from each run's trace (the copies' `bytes`, the decode steps' wall time).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default=None, help="[default: the small Mixtral-like checkpoint]")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--shares", default="0,0.5,1")
    parser.add_argument("--link-gbps", type=float, default=2.0)
    parser.add_argument("--budget-share", type=float, default=0.6, help="device budget, a share of the model's bytes")
    args = parser.parse_args()

    import torch

    from moegen.bench.flops import model_work
    from moegen.bench.host_attention import per_step_bytes
    from moegen.checkpoints.demo import cached_checkpoint
    from moegen.models.hf_config import generation_eos_ids
    from moegen.models.loader import load_checkpoint
    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request
    from moegen.trace.summarize import parse

    model_dir = args.model_dir or cached_checkpoint("mixtral", "small", "bench")
    cfg, weights, _ = load_checkpoint(model_dir)
    gen = torch.Generator().manual_seed(0)
    requests = [Request(torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist(), args.new_tokens,
                        ignore_eos=True) for _ in range(args.requests)]
    budget = int(model_work(model_dir).weight_bytes * args.budget_share)
    print(f"{model_dir}: {args.requests} sequences of {args.prompt_len} + {args.new_tokens} tokens, device budget "
          f"{budget / 2**20:.0f} MiB, simulated link {args.link_gbps} GB/s")
    print("share  staged KV MB/step  host q,k,v + out MB/step  decode tok/s")
    with tempfile.TemporaryDirectory() as tmp:
        for share in (float(s) for s in args.shares.split(",")):
            rcfg = RuntimeConfig(batch_size=args.requests, max_seq_len=args.prompt_len + args.new_tokens,
                                 gpu_memory=budget, sim_link_gbps=args.link_gbps, cpu_attention=share)
            trace = Path(tmp) / f"{share}.pftrace"
            with Engine(cfg, weights, rcfg, generation_eos_ids(model_dir, cfg), trace=trace) as engine:
                list(engine.generate(requests))
            slices = parse(trace).slices
            steps = [s for s in slices if s.track == "event loop" and s.args.get("phase") == "decode"]
            ids = {int(s.args["step"]) for s in steps}

            def per_step(*prefixes: str) -> float:
                return per_step_bytes(slices, ids, *prefixes) / 1e6

            seconds = sum(s.end - s.start for s in steps) / 1e9
            tokens = sum(int(s.args["sequences"]) for s in steps)
            print(f"{share:5.2f}  {per_step('stage KV['):17.2f}  "
                  f"{per_step('send to host attention[', 'return host attention['):24.2f}  {tokens / seconds:12.1f}")


if __name__ == "__main__":
    main()
