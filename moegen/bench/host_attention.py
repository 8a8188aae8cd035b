"""`moegen bench --scenario host-attention`: a share of decode attention on the host, in the offload regime
(the cpu backend under a device budget and a simulated link), at share 0 and at the share the planner chooses
for the job (every other knob as planned, the same in both runs): decode tok/s, the KV staged and the bytes
crossing for host-attended sequences per decode step, and the cost model's predicted decode step against the
measured one. On the cpu backend the host worker and the "device" share the cores, so what host attention
buys here is the link time of the KV it no longer stages, not a second processor's compute.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from moegen.runtime.config import RuntimeConfig


@dataclass(frozen=True, slots=True)
class HostAttentionOptions:
    requests: int = 64
    prompt_len: int = 512
    new_tokens: int = 64
    link_gbps: float = 0.5  # simulated: at these contexts the staged KV, not the weights, binds the step
    budget_share: float = 1.18  # device budget, a share of the model's bytes: most modules resident
    seed: int = 0


def per_step_bytes(slices, steps: set[int], *prefixes: str) -> float:
    """Bytes per step of the copies named with one of `prefixes`, over `steps`."""
    total = sum(int(s.args["bytes"]) for s in slices
                if s.name.startswith(prefixes) and int(s.args.get("step", -1)) in steps)
    return total / max(len(steps), 1)


def scenario(model_dir: Path, o: HostAttentionOptions, say=print) -> dict:
    import torch

    from moegen.bench.flops import model_work
    from moegen.models.loader import load_checkpoint
    from moegen.planner.cost import ModelFacts, predict, setting
    from moegen.planner.plan import calibration_for, plan_run, workload_of
    from moegen.runtime.requests import Request

    cfg, weights, _ = load_checkpoint(model_dir)
    gen = torch.Generator().manual_seed(o.seed)
    requests = [Request(torch.randint(3, cfg.vocab_size, (o.prompt_len,), generator=gen).tolist(), o.new_tokens,
                        ignore_eos=True) for _ in range(o.requests)]
    budget = int(model_work(model_dir).weight_bytes * o.budget_share)
    base = RuntimeConfig(device="cpu", max_seq_len=o.prompt_len + o.new_tokens, gpu_memory=budget,
                         sim_link_gbps=o.link_gbps)
    say(f"host attention: {o.requests} requests of {o.prompt_len} + {o.new_tokens} tokens, device budget "
        f"{budget / 2**20:.0f} MiB, simulated link {o.link_gbps} GB/s; planning ...")
    workload = workload_of(requests, base)
    plan = plan_run(cfg, weights, base, frozenset(), workload, say)
    cal, profile = calibration_for(cfg, weights, base)
    facts = ModelFacts.of(cfg, weights, base.torch_dtype)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="moegen-host-attention-") as tmp:
        for name, rcfg in (("share 0", dataclasses.replace(plan.rcfg, cpu_attention=0.0)), ("planned", plan.rcfg)):
            predicted = predict(facts, setting(facts, rcfg, cal.machine, budget), profile, cal.machine, workload)
            runs[name] = _run(model_dir, cfg, weights, rcfg, requests, Path(tmp) / f"{name}.pftrace", predicted)
            r = runs[name]
            say(f"  {name} (share {r['share']}): {r['decode_tok_s']:.1f} decode tok/s, {r['staged_mb']:.2f} MB KV staged "
                f"a decode step; predicted step {r['predicted_step_s'] * 1e3:.1f} ms, measured {r['step_s'] * 1e3:.1f} ms")
    zero, planned = runs["share 0"], runs["planned"]
    return {"model": str(model_dir), "options": dataclasses.asdict(o), "budget_bytes": budget,
            "knobs": {k: getattr(plan.rcfg, k) for k in ("batch_size", "attn_micro_batch", "expert_slots",
                                                          "resident_experts", "cpu_attention")},
            "runs": runs, "decode_tok_s_ratio": planned["decode_tok_s"] / zero["decode_tok_s"]}


def _run(model_dir, cfg, weights, rcfg: RuntimeConfig, requests, trace: Path, predicted) -> dict:
    from moegen.bench.offload import decode_numbers
    from moegen.models.hf_config import generation_eos_ids
    from moegen.runtime.engine import Engine
    from moegen.trace.summarize import parse

    with Engine(cfg, weights, rcfg, generation_eos_ids(model_dir, cfg), trace=trace) as engine:
        list(engine.generate(requests))
    slices = parse(trace).slices
    steps = {int(s.args["step"]) for s in slices if s.track == "event loop" and s.args.get("phase") == "decode"}
    d = decode_numbers(trace)
    return {"share": rcfg.cpu_attention, "decode_tok_s": d["decode_tok_s"],
            "step_s": d["decode_s"] / max(d["decode_steps"], 1), "decode_steps": d["decode_steps"],
            "staged_mb": per_step_bytes(slices, steps, "stage KV[") / 1e6,
            "host_mb": per_step_bytes(slices, steps, "send to host attention[", "return host attention[") / 1e6,
            "predicted_step_s": predicted.decode.seconds, "predicted_decode_tok_s": predicted.decode_tok_s}
