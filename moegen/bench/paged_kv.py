"""What the paged host KV cache buys (`moegen bench --scenario paged-kv`), each job's modes side by side.

Long-tail job, in the offload regime (the cpu backend under the offload scenario's device budget and simulated
link, `offload.link_for`): short prompts whose rows may each grow by up to `max_new` tokens, while their caps
are drawn from a clipped lognormal (fixed seed) whose mean is far below it; EOS ignored, so each row's length
is exactly its cap. One `host_kv_memory` for both modes, sized so that today's row reservation (every sequence
holds a row of max_seq_len) holds `rows` sequences: "rows" runs with batch_size = `rows` (admission can never
exceed them), "paged" with batch_size = `paged_factor` x `rows`, so only the KV blocks bound it. Expected: both
the sequences in flight and decode tok/s up by about worst-case / mean blocks per sequence, since a link-bound
decode step costs about the same at either batch.

Shared-prefix job, plain cpu (no budget, no link): one `prefix_len`-token prefix (random ids, fixed seed) and
`questions` distinct short questions, short answers; with and without prefix sharing. Prefill compute is what
sharing saves, and a simulated link would add the same weight traffic per step to both runs and hide it.

Each mode runs in its own process, so its peak resident memory (VmHWM) is its own.
"""

from __future__ import annotations

import math
import multiprocessing
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from moegen.runtime.config import RuntimeConfig


@dataclass(frozen=True, slots=True)
class ModeRun:
    """One mode's run, handed to its own process."""

    name: str  # as the table shows it
    model_dir: Path
    rcfg: RuntimeConfig
    requests: list[tuple[list[int], int]]  # (prompt ids, max_new_tokens); EOS ignored
    trace: Path | None  # write the run's trace here and read the admission-bound steps from it


def run_apart(run: ModeRun) -> dict:
    """`run` in a fresh process (spawned: nothing of this one's memory is inherited), its numbers back; a process
    that dies raises here (BrokenProcessPool) rather than being replaced."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run, run).result()


def _run(run: ModeRun) -> dict:
    from moegen.models.hf_config import generation_eos_ids
    from moegen.models.loader import load_checkpoint
    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request
    from moegen.serve import peak_rss_bytes

    cfg, weights, _ = load_checkpoint(run.model_dir)
    requests = [Request(p, n, ignore_eos=True) for p, n in run.requests]
    with Engine(cfg, weights, run.rcfg, generation_eos_ids(run.model_dir, cfg), trace=run.trace) as engine:
        start = time.perf_counter()
        generated = sum(len(r.token_ids) for r in engine.generate(requests))
        seconds = time.perf_counter() - start
        stats, rt, placement = engine.stats, engine.runtime, engine.runtime.placement
        kv, flight = stats.kv, stats.sequences_per_step
        out = {"name": run.name, "batch_size": rt.batch_size, "host_kv_memory": run.rcfg.host_kv_memory,
               "requests": len(requests), "generated": generated, "seconds": seconds, "tok_s": generated / seconds,
               "steps": stats.steps, "sequences_mean": sum(flight) / max(len(flight), 1),
               "sequences_max": max(flight, default=0), "tokens_per_step_max": max(stats.tokens_per_step, default=0),
               "blocks": kv.blocks, "block_size": kv.block_size, "prefix_sharing": kv.prefix_sharing,
               "prefill_tokens": kv.prefill_tokens, "prefix_hit_tokens": kv.prefix_hit_tokens,
               "prefix_hit_rate": kv.prefix_hit_rate, "preemptions": kv.preemptions,
               "recomputed_tokens": kv.recomputed_tokens, "outgrew_pool": kv.outgrew_pool,
               "peak_blocks_held": kv.peak_blocks_held, "host_bytes": rt.host_bytes,
               "expert_slots": placement.pools["expert"].count if "expert" in placement.pools else 0,
               "resident_experts": sum(m.kind == "expert" for m in placement.resident_modules)}
    out["peak_rss_bytes"] = peak_rss_bytes()
    if run.trace is not None:
        out["admission_bound"] = admission_bound(run.trace)
    return out


def admission_bound(trace: Path) -> dict:
    """From a run's trace: the steps during which prompts were still waiting (what bounds the batch there is
    admission, not the job's drain of its last long rows): their count, the sequences in flight (the trace's
    counter), and the tokens generated over their wall time."""
    from moegen.trace.summarize import parse

    parsed = parse(trace)
    steps = sorted((s for s in parsed.slices if s.track == "event loop" and s.name.startswith("step ")),
                   key=lambda s: s.start)
    waiting, flight, generated = ([v for _, v in parsed.counters[name]] for name in
                                  ("sequences waiting", "sequences in flight", "generated tokens"))
    before = [0.0] + generated[:-1]
    picked = [i for i in range(len(steps)) if waiting[i] > 0]
    seconds = sum(steps[i].end - steps[i].start for i in picked) / 1e9
    tokens = sum(generated[i] - before[i] for i in picked)
    return {"steps": len(picked), "seconds": seconds, "generated": tokens, "tok_s": tokens / seconds if seconds else 0.0,
            "sequences_mean": sum(flight[i] for i in picked) / len(picked) if picked else 0.0,
            "trace_sequences_max": max(flight, default=0)}


def long_tail_caps(count: int, mean: float, cap: int, seed: int, sigma: float = 1.2) -> list[int]:
    """`count` output caps from a lognormal of about `mean` (before clipping) and shape `sigma`, clipped to
    1..`cap`."""
    rng = random.Random(seed)
    mu = math.log(mean) - sigma**2 / 2
    return [max(1, min(cap, round(rng.lognormvariate(mu, sigma)))) for _ in range(count)]


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]  # past the special ids: no BOS/EOS in the middle


def long_tail(model_dir: Path, requests: int, rows: int, paged_factor: int, prompt_len: tuple[int, int],
              max_new: int, mean_new: float, hide_tokens: int, budget_share: float, seed: int, workdir: Path,
              say=print) -> dict:
    """Rows against paged under one host KV budget that holds `rows` rows of max_seq_len."""
    from moegen.bench.flops import model_work
    from moegen.bench.offload import link_for
    from moegen.models.hf_config import load_model_config
    from moegen.models.kv_cache import kv_bytes_per_token

    cfg = load_model_config(model_dir)
    rng = random.Random(seed)
    caps = long_tail_caps(requests, mean_new, max_new, seed)
    jobs = [(random_ids(rng, rng.randint(*prompt_len), cfg.vocab_size), c) for c in caps]
    seq_len = prompt_len[1] + max_new
    kv_token = kv_bytes_per_token(cfg, RuntimeConfig(device="cpu").torch_dtype)
    host_kv = rows * seq_len * kv_token
    budget = int(model_work(model_dir).weight_bytes * budget_share)
    link, flop_s = link_for(model_dir, hide_tokens)
    # Same knobs in both modes but B: the step's tokens and attention launches don't grow with it.
    base = RuntimeConfig(device="cpu", batch_size=rows, gpu_memory=budget, sim_link_gbps=link, max_seq_len=seq_len,
                         host_kv_memory=host_kv, max_step_tokens=paged_factor * rows + seq_len, attn_micro_batch=16)
    say(f"  long tail: {requests} requests, prompts {prompt_len[0]}-{prompt_len[1]} tokens, caps up to {max_new} "
        f"(mean {sum(caps) / len(caps):.1f}, max {max(caps)}); host KV {host_kv / 2**20:.1f} MiB = {rows} rows of "
        f"{seq_len}; device budget {budget / 2**20:.0f} MiB, simulated link {link:.3f} GB/s")
    # Paged first: its larger B takes more activation memory, so what fits beside it (resident experts, slots) is
    # what the rows run is then given too; the two runs then stream the same bytes per step.
    paged = _long_tail_mode("paged", model_dir, replace(base, batch_size=paged_factor * rows), jobs, workdir, say)
    rows_run = _long_tail_mode("rows", model_dir, replace(base, resident_experts=paged["resident_experts"],
                                                          expert_slots=paged["expert_slots"]), jobs, workdir, say)
    runs = {"rows": rows_run, "paged": paged}
    block = base.kv_block_size
    mean_blocks = sum(-(-(len(p) + c - 1) // block) for p, c in jobs) / len(jobs)
    return {"requests": requests, "rows": rows, "paged_factor": paged_factor, "prompt_len": list(prompt_len),
            "max_new": max_new, "seq_len": seq_len, "caps_total": sum(caps), "caps_mean": sum(caps) / len(caps),
            "caps_max": max(caps), "caps_median": sorted(caps)[len(caps) // 2], "seed": seed,
            "host_kv_memory": host_kv, "budget_bytes": budget, "link_gbps": link, "expert_gemm_flop_s": flop_s,
            "hide_tokens": hide_tokens, "budget_share": budget_share,
            "worst_over_mean_tokens": seq_len / sum(len(p) + c for p, c in jobs) * len(jobs),
            "worst_over_mean_blocks": -(-seq_len // block) / mean_blocks, "runs": runs,
            "ratios": {k: _ratio(paged, rows_run, k) for k in ("sequences_mean", "sequences_max", "tok_s", "peak_rss_bytes")}
            | {"seconds": rows_run["seconds"] / paged["seconds"],
               "admission_bound_tok_s": _ratio(paged["admission_bound"], rows_run["admission_bound"], "tok_s"),
               "admission_bound_sequences": _ratio(paged["admission_bound"], rows_run["admission_bound"], "sequences_mean")}}


def _long_tail_mode(name: str, model_dir: Path, rcfg: RuntimeConfig, jobs: list, workdir: Path, say) -> dict:
    say(f"    {name}: batch_size {rcfg.batch_size} ...")
    r = run_apart(ModeRun(name, model_dir, rcfg, jobs, workdir / f"{name}.pftrace"))
    say(f"      {r['seconds']:.1f} s, {r['tok_s']:.1f} tok/s, sequences in flight mean {r['sequences_mean']:.1f} "
        f"max {r['sequences_max']}, preemptions {r['preemptions']}; {r['resident_experts']} experts resident, "
        f"{r['expert_slots']} slots")
    return r


def shared_prefix(model_dir: Path, questions: int, prefix_len: int, question_len: int, new_tokens: int, batch: int,
                  seed: int, say=print) -> dict:
    """One prefix and `questions` distinct questions, with and without prefix sharing, plain cpu."""
    from moegen.models.hf_config import load_model_config

    cfg = load_model_config(model_dir)
    rng = random.Random(seed)
    prefix = random_ids(rng, prefix_len, cfg.vocab_size)
    asked = set()
    while len(asked) < questions:
        asked.add(tuple(random_ids(rng, question_len, cfg.vocab_size)))
    jobs = [(prefix + list(q), new_tokens) for q in sorted(asked)]
    rng.shuffle(jobs)
    base = RuntimeConfig(device="cpu", batch_size=batch, max_seq_len=prefix_len + question_len + new_tokens)
    say(f"  shared prefix: {questions} questions of {question_len} tokens after one {prefix_len}-token prefix, "
        f"{new_tokens} new tokens each, batch_size {batch}, plain cpu")
    runs = {}
    for name, sharing in (("no sharing", False), ("sharing", True)):
        say(f"    {name} ...")
        runs[name] = run_apart(ModeRun(name, model_dir, replace(base, prefix_sharing=sharing), jobs, None))
        r = runs[name]
        say(f"      {r['seconds']:.1f} s, prefill tokens {r['prefill_tokens']}, prefix hits {r['prefix_hit_tokens']}")
    off, on = runs["no sharing"], runs["sharing"]
    return {"questions": questions, "prefix_len": prefix_len, "question_len": question_len, "new_tokens": new_tokens,
            "batch": batch, "seed": seed, "shared_full_blocks": prefix_len // base.kv_block_size, "runs": runs,
            "ratios": {"seconds": off["seconds"] / on["seconds"], "prefill_tokens": off["prefill_tokens"] / on["prefill_tokens"],
                       "peak_rss_bytes": _ratio(on, off, "peak_rss_bytes")}}


def _ratio(a: dict, b: dict, key: str) -> float | None:
    return a[key] / b[key] if b[key] else None


@dataclass(frozen=True, slots=True)
class PagedKVOptions:
    requests: int = 256  # long tail: rows in the job
    rows: int = 16  # long tail: rows of max_seq_len the host KV budget holds (today's row reservation's B)
    paged_factor: int = 8  # long tail: the paged run's batch_size, in rows
    prompt_len: tuple[int, int] = (16, 32)  # long tail: shortest, longest prompt
    max_new: int = 512  # long tail: every row's worst case (max_seq_len = longest prompt + this)
    mean_new: float = 48.0  # long tail: the caps' lognormal mean before clipping
    # The offload scenario's link rule (`offload.link_for`), 10x its default speed: a job of 500+ decode steps
    # then takes minutes per mode, and each expert's <= B * top_k / experts tokens a step still take far less
    # compute than its copy, so both modes stay link-bound.
    hide_tokens: int = 200
    budget_share: float = 0.6  # device budget, as a share of the model's bytes: the small model's lm_head alone is
    # a quarter of them, and B 128's launches over 544-token rows need ~35 MiB beside it (a half leaves no room
    # for two expert slots); 0.6 keeps 3 of its 24 experts resident and streams the rest
    questions: int = 1000  # shared prefix
    prefix_len: int = 512
    question_len: int = 16
    answer_tokens: int = 8
    prefix_batch: int = 256
    seed: int = 0


def scenario(model_dir: Path, o: PagedKVOptions, say=print) -> dict:
    """Both jobs; every raw number for the JSON."""
    say(f"paged KV: {model_dir}")
    with tempfile.TemporaryDirectory(prefix="moegen-paged-kv-") as tmp:
        tail = long_tail(model_dir, o.requests, o.rows, o.paged_factor, o.prompt_len, o.max_new, o.mean_new,
                         o.hide_tokens, o.budget_share, o.seed, Path(tmp), say)
    prefix = shared_prefix(model_dir, o.questions, o.prefix_len, o.question_len, o.answer_tokens, o.prefix_batch,
                           o.seed, say)
    return {"model": str(model_dir), "long_tail": tail, "shared_prefix": prefix}
