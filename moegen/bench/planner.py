"""The planner against measurement, on the cpu backend: for each configuration (a bench checkpoint,
a job, a device budget and simulated link or none), the automatic plan's predicted prefill, decode
and job tokens/s against the same run measured, and the plan's measured job throughput against the
best of a measured grid of hand-set knobs (each grid point also predicted, so the model is checked
across the grid, not only at its own choice).

Measured: decode tokens/s over the full decode steps of the run's trace (every sequence in flight
decoding), prefill tokens/s over its prompt-only steps, job tokens/s = generated tokens over the
engine's generation time. Prompts are random token ids of one length and every request generates
its full count (EOS ignored), which is the workload the planner is told.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moegen.bench.offload import decode_numbers
from moegen.checkpoints.demo import cached_checkpoint
from moegen.models.loader import load_checkpoint
from moegen.planner.cost import ModelFacts, Workload, predict, setting
from moegen.planner.plan import calibration_for, plan_run
from moegen.planner.search import PLANNED
from moegen.runtime.backend import DeviceBudgetError
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.engine import Engine
from moegen.runtime.requests import Request
from moegen.trace.summarize import parse


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    family: str  # a bench checkpoint
    requests: int
    prompt_len: int
    new_tokens: int
    budget_share: float | None  # device budget as a share of the float32 weights; None: unbudgeted
    link_gbps: float | None  # simulated link


CONFIGS = (
    Config("mixtral, no budget", "mixtral", 128, 32, 12, None, None),
    Config("deepseek, no budget", "deepseek_v2", 128, 32, 12, None, None),
    Config("mixtral, 1/3 on device, 0.5 GB/s", "mixtral", 256, 4, 4, 1 / 3, 0.5),
    Config("deepseek, 1/3 on device, 1 GB/s", "deepseek_v2", 256, 4, 4, 1 / 3, 1.0),
    Config("mixtral, 1/2 on device, 4 GB/s", "mixtral", 256, 16, 6, 1 / 2, 4.0),
)


def run_config(c: Config, say: Callable[[str], None]) -> dict:
    model_dir = cached_checkpoint(c.family, "bench", "bench")
    cfg, weights, _ = load_checkpoint(model_dir)
    facts = ModelFacts.of(cfg, weights, torch.float32)
    weight_bytes = facts.arena_bytes + facts.core_bytes + weights.embed_tokens.numel() * 4
    budget = None if c.budget_share is None else int(weight_bytes * c.budget_share)
    S = c.prompt_len + c.new_tokens
    base = RuntimeConfig(device="cpu", max_seq_len=S, gpu_memory=budget, sim_link_gbps=c.link_gbps)
    workload = Workload(c.requests, c.prompt_len, c.new_tokens, S)
    plan = plan_run(cfg, weights, base, frozenset(), workload, say)
    say(f"  plan: {', '.join(f'{k}={v}' for k, v in plan.best.knobs().items())}; predicted job "
        f"{plan.best.predicted.job_tok_s:.1f} tok/s")
    cal, profile = calibration_for(cfg, weights, base)  # what the plan was made from (cached)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (c.prompt_len,), generator=gen).tolist() for _ in range(c.requests)]
    runs = [_measure(cfg, weights, plan.rcfg, prompts, c.new_tokens, plan.best.predicted, "plan")]
    say(f"    measured {_line(runs[0])}")
    grid = []
    sizes = {c.requests // 2, c.requests} | ({c.requests // 4} if budget is None else set())  # link-bound runs are slow
    for b in sorted(sizes):
        for mb in sorted({b, max(1, b // 8)}):
            for resident in ([None] if budget is None else [None, 0]):
                knobs = dict(batch_size=b, attn_micro_batch=mb, resident_experts=resident,
                             max_step_tokens=max(8192, b - 1 + S))
                grid.append(dataclasses.replace(base, **knobs))
    for rcfg in grid:
        try:
            s = setting(facts, rcfg, cal.machine, budget)
        except DeviceBudgetError as exc:  # a grid point that doesn't fit the budget is skipped, said why
            say(f"    grid B={rcfg.batch_size} attention {rcfg.attn_micro_batch} resident "
                f"{rcfg.resident_experts}: skipped ({exc})")
            continue
        predicted = predict(facts, s, profile, cal.machine, workload)
        run = _measure(cfg, weights, rcfg, prompts, c.new_tokens, predicted, "grid")
        runs.append(run)
        say(f"    grid {run['knobs']}: {_line(run)}")
    best_grid = max((r for r in runs if r["kind"] == "grid"), key=lambda r: r["measured"]["job_tok_s"])
    # This machine's speed drifts by 10-15% between runs: the plan and the grid's best run once more
    # each, back to back, and each keeps its better measurement.
    again = {}
    for kind, run in (("plan", runs[0]), ("grid", best_grid)):
        rcfg = dataclasses.replace(base, **run["knobs"])
        again[kind] = _measure(cfg, weights, rcfg, prompts, c.new_tokens, plan.best.predicted if kind == "plan"
                               else predict(facts, setting(facts, rcfg, cal.machine, budget), profile, cal.machine,
                                            workload), kind + " again")
        runs.append(again[kind])
        say(f"    {kind} again: {_line(again[kind])}")
    plan_best = max(runs[0]["measured"]["job_tok_s"], again["plan"]["measured"]["job_tok_s"])
    grid_best = max(best_grid["measured"]["job_tok_s"], again["grid"]["measured"]["job_tok_s"])
    return {"config": dataclasses.asdict(c), "model": str(model_dir), "budget_bytes": budget,
            "plan": {k: getattr(plan.rcfg, k) for k in PLANNED}, "bound": plan.bound,
            "decode_busy": plan.to_json()["predicted"]["decode_busy"], "runs": runs,
            "plan_job_tok_s": plan_best, "grid_best_job_tok_s": grid_best, "plan_vs_grid_best": plan_best / grid_best,
            "grid_best": best_grid["knobs"]}


def _measure(cfg, weights, rcfg, prompts, new_tokens: int, predicted, kind: str) -> dict:
    requests = [Request(p, new_tokens, ignore_eos=True) for p in prompts]
    with tempfile.TemporaryDirectory(prefix="moegen-plan-bench-") as tmp:
        trace = Path(tmp) / "run.pftrace"
        with Engine(cfg, weights, rcfg, (), trace=trace) as engine:
            start = time.perf_counter()
            generated = sum(len(r.token_ids) for r in engine.generate(requests))
            took = time.perf_counter() - start
        decode = decode_numbers(trace)
        steps = [s for s in parse(trace).slices if s.track == "event loop" and s.args.get("phase") == "prefill"]
        prefill_s = sum(s.end - s.start for s in steps) / 1e9
        prefill_tokens = sum(int(s.args.get("prefill_tokens", 0)) for s in steps)
    measured = {"decode_tok_s": decode["decode_tok_s"], "prefill_tok_s": prefill_tokens / prefill_s if prefill_s else 0.0,
                "job_tok_s": generated / took, "job_s": took, "decode_steps": decode["decode_steps"]}
    pred = {"decode_tok_s": predicted.decode_tok_s, "prefill_tok_s": predicted.prefill_tok_s,
            "job_tok_s": predicted.job_tok_s, "job_s": predicted.job_s}
    return {"kind": kind, "knobs": {k: getattr(rcfg, k) for k in PLANNED}, "predicted": pred, "measured": measured,
            "ratio": {k: measured[k] / pred[k] if pred[k] else None for k in ("decode_tok_s", "prefill_tok_s", "job_tok_s")}}


def _line(run: dict) -> str:
    m, p = run["measured"], run["predicted"]
    return (f"decode {m['decode_tok_s']:.1f} (predicted {p['decode_tok_s']:.1f}), prefill {m['prefill_tok_s']:.1f} "
            f"({p['prefill_tok_s']:.1f}), job {m['job_tok_s']:.1f} ({p['job_tok_s']:.1f}) tok/s")


def scenario(say: Callable[[str], None], configs=CONFIGS) -> list[dict]:
    results = []
    for c in configs:
        say(f"planner: {c.name}")
        results.append(run_config(c, say))
    return results
