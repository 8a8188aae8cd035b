"""Planning a run: calibration (cached) + the model's profile (cached) + the search, and how a plan reads.

    plan = plan_run(cfg, weights, rcfg, user_knobs, workload)
    engine = Engine(cfg, weights, plan.rcfg, ...)
"""

from __future__ import annotations

from collections.abc import Callable

from moegen.config import ModelConfig
from moegen.models.weights import ModelWeights
from moegen.planner.calibrate import Calibration, Profile, calibrated, save
from moegen.planner.cost import ModelFacts, Workload
from moegen.planner.profile import measure_in_run, measure_profile, signature
from moegen.planner.search import PLANNED, Plan, host_kv_limit, search
from moegen.planner.steadiness import measuring
from moegen.runtime.config import RuntimeConfig
from moegen.units import format_bytes


def plan_run(cfg: ModelConfig, weights: ModelWeights, rcfg: RuntimeConfig, user: frozenset[str], workload: Workload,
             say: Callable[[str], None] = lambda _: None, recalibrate: bool = False) -> Plan:
    """The plan for running `workload` on this model: the knobs in `user` stay as set in `rcfg`."""
    cal, profile = calibration_for(cfg, weights, rcfg, say, recalibrate)
    facts = ModelFacts.of(cfg, weights, rcfg.torch_dtype)
    return search(facts, rcfg, user, cal.machine, profile, workload, device_budget(rcfg), host_kv_limit(rcfg))


def calibration_for(cfg: ModelConfig, weights: ModelWeights, rcfg: RuntimeConfig,
                    say: Callable[[str], None] = lambda _: None, recalibrate: bool = False) -> tuple[Calibration, Profile]:
    """The device's calibration and this model's profile on it, measured and cached when missing."""
    cal = calibrated(rcfg.device, recalibrate, say)
    cpu_dtype_note(rcfg, cal.machine, say)
    sig = signature(cfg, rcfg.dtype, weights)
    if sig not in cal.profiles:
        say("profiling this model's modules on the device (cached for later runs) ...")
        with measuring() as found:
            profile = measure_profile(cfg, weights, rcfg.device, rcfg.torch_dtype, say)
            profile.in_run = measure_in_run(cfg, weights, rcfg, profile)
        cal.profiles[sig], cal.steadiness[sig] = profile, found
        if not found.steady:
            say(found.note("this model's profile"))
        save(cal)
    profile = cal.profiles[sig]
    threads = rcfg.cpu_attention_threads or torch_threads()
    if profile.host_attn is None or profile.host_attn_threads != threads:  # not yet, or with other threads
        from moegen.planner.host_profile import measure_host_attention

        say(f"measuring decode attention on the host, {threads} threads (cached for later runs) ...")
        profile.host_attn = measure_host_attention(cfg, rcfg.torch_dtype, threads)
        profile.host_attn_threads = threads
        save(cal)
    return cal, profile


BF16_WORTH = 1.25  # bfloat16 matmuls this much faster than float32's in calibration: worth a line


def cpu_dtype_note(rcfg: RuntimeConfig, machine, say: Callable[[str], None]) -> None:
    """Say so when the other dtype would run faster on this cpu (calibration measured both): --dtype bfloat16
    where its matmuls were slower than float32's, float32 where bfloat16's were BF16_WORTH times faster."""
    from moegen.models.linear import native_bf16

    speedup = machine.bf16_speedup
    if rcfg.device != "cpu" or speedup <= 0:
        return
    if rcfg.dtype == "float32" and speedup >= BF16_WORTH:
        say(f"bfloat16 matmuls ran at {speedup:.2f}x float32's speed on this CPU in calibration (native bf16): "
            f"--dtype bfloat16 runs this job faster, its tokens then differing from float32's by rounding")
    if rcfg.dtype != "bfloat16" or speedup >= 1:
        return
    why = "it reports native bf16, yet" if native_bf16() else "it has no native bf16 (AVX-512-BF16 or AMX), so"
    say(f"--dtype bfloat16 is slower than float32 on this CPU: {why} its matmuls ran at {speedup:.2f}x float32's "
        f"speed in calibration; --dtype float32 runs this job faster (and exactly)")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def device_budget(rcfg: RuntimeConfig) -> int | None:
    """The device budget the run will hold to: --gpu-memory, or on cuda what the backend would take."""
    if rcfg.gpu_memory is not None or rcfg.device == "cpu":
        return rcfg.gpu_memory
    import torch

    from moegen.runtime.cuda_backend import CudaBackend

    return CudaBackend.default_budget(torch.device("cuda", 0))


def format_plan(plan: Plan, alternatives: bool = True) -> str:
    """The plan in words: knobs (planned or set), prediction, bounds, limits, runners-up."""
    best, w = plan.best, plan.workload
    p, s = best.predicted, best.setting
    knobs = []
    for name in PLANNED:
        value = getattr(plan.rcfg, name)
        shown = {None: "auto"}.get(value, value) if name != "expert_micro_batch" else (value or "all tokens")
        if name == "host_kv_memory" and value is not None:
            shown = format_bytes(value).replace(" ", "")
        knobs.append(f"{name}={shown}{' (yours)' if name in plan.user else ''}")
    link = f"{s.link_gbps:g} GB/s link" if s.link_gbps else "no link in use"
    lines = [
        f"workload: {w.requests} requests, {w.prompt_len:.0f} prompt + {w.new_tokens:.0f} new tokens on average, "
        f"rows of {w.max_seq_len} tokens",
        "knobs: " + " ".join(knobs),
        f"runs as: B={s.batch}, attention launches of {s.micro} sequences"
        + (", KV staged per launch" if s.stage_kv else "")
        + f", {len(s.residency.resident)} modules resident, slots {dict(s.residency.pools) or 'none'}, {link}",
    ] + ([f"fp8: {s.fp8_residents[0]} resident modules' FP8 linears dequantized once at load (+"
          f"{s.fp8_residents[1] / 2**20:.1f} MiB on the device); streamed ones dequantized by each launch"]
         if s.fp8_residents[0] else []) + [kv_line(plan)] + _host_line(plan) + [
        f"predicted: prefill {p.prefill_tok_s:.1f} tok/s, decode {p.decode_tok_s:.1f} tok/s; the job "
        f"{p.job_s:.1f}s, {p.job_tok_s:.1f} generated tok/s",
        f"bound: prefill by {p.prefill.bound} ({_busy(p.prefill)}), decode by {p.decode.bound} ({_busy(p.decode)})",
        "memory: " + (f"device {s.device_bytes / 2**20:.1f} of {s.budget / 2**20:.1f} MiB, "
                      if s.device_bytes is not None else "device unbudgeted, ")
        + f"host {s.host_bytes / 2**30:.2f} GiB (weights + KV)",
    ] + [f"limit: {text}" for text in plan.limits]
    if plan.alternatives and alternatives:
        lines.append(f"runners-up (of {plan.considered} fitting configs):")
        for c in plan.alternatives:
            a = c.summary()
            lines.append(f"  B={a['batch']} attention {c.setting.micro} slots {a['expert_slots']} resident experts "
                         f"{a['resident_experts']}: {a['job_tok_s']:.1f} tok/s "
                         f"({a['job_tok_s'] / p.job_tok_s:.0%} of the plan)")
    return "\n".join(lines)


def kv_line(plan: Plan) -> str:
    """The host KV cache of the plan: its blocks, what a sequence is expected to hold, the prefix hits, and
    whether admission can outrun the blocks (then the newest sequences are preempted and recomputed)."""
    from moegen.planner.search import expected_blocks

    rcfg, w, s = plan.rcfg, plan.workload, plan.best.setting
    if rcfg.batching == "model":
        return f"kv: on the device, {s.batch} rows of {w.max_seq_len} tokens"
    size = rcfg.kv_block_size
    line = (f"kv: {s.kv_blocks} blocks of {size} tokens in host memory; a sequence expected to hold "
            f"{expected_blocks(w, size) * size} tokens (prompt + cap), at most {w.max_seq_len}; "
            f"shared prefix blocks hold {w.prefix_hit_rate:.0%} of the prompt tokens; ")
    if s.kv_blocks * size >= min(s.batch, w.requests) * w.max_seq_len:
        return line + "no preemptions (every sequence's longest fits)"
    if w.caps_differ:
        return line + "no preemptions expected (admission reserves what each row's cap needs)"
    return line + ("admission starts from the cap and adapts to the output lengths seen; a sequence that outgrows "
                   "them is preempted and recomputed")


def _host_line(plan: Plan) -> list[str]:
    """The share of decode attention on the host, when there is one: how many sequences, and its time a step."""
    share = plan.rcfg.cpu_attention
    if not share:
        return []
    p, w = plan.best.predicted, plan.workload
    seconds = p.decode.modules.get("host attention", 0.0)
    sequences = round(share * min(plan.best.setting.batch, w.requests))
    return [f"host attention: {share:.0%} of each decode step's sequences ({sequences}), {seconds * 1e3:.1f} ms of "
            "host time a decode step; none of their KV is staged"]


def _busy(t) -> str:
    return f"step {t.seconds * 1e3:.1f} ms: compute {t.compute_s / t.seconds:.0%}, link {t.link_s / t.seconds:.0%}"


def workload_of(requests, rcfg: RuntimeConfig) -> Workload:
    """The workload of a list of runtime Requests (their max_new_tokens: EOS may end some earlier), and the share
    of their prompt tokens that shared prefix blocks would hold under `rcfg`."""
    from moegen.runtime.kv.prefix import shared_prefix_tokens

    n, prompt_tokens = len(requests), sum(len(r.prompt_ids) for r in requests)
    shared = (shared_prefix_tokens([r.prompt_ids for r in requests], rcfg.kv_block_size)
              if rcfg.prefix_sharing and rcfg.batching == "module" else 0)
    return Workload(n, prompt_tokens / n, sum(r.max_new_tokens for r in requests) / n, rcfg.max_seq_len,
                    shared / prompt_tokens, len({r.max_new_tokens for r in requests}) > 1)


def open_engine(model_dir, rcfg: RuntimeConfig, requests, user: frozenset[str] | None,
                say: Callable[[str], None], trace=None, trace_steps=None, workload: Workload | None = None):
    """(engine, plan) for running `requests` on the checkpoint in `model_dir`. With `user` (the knobs the
    user set), every other knob is planned for `workload` (default: that of `requests`), the plan printed
    through `say` and recorded in the trace; `user` None runs `rcfg` as it is (plan None)."""
    from moegen.models.hf_config import generation_eos_ids
    from moegen.models.loader import load_checkpoint
    from moegen.runtime.auto import resolve_dtype
    from moegen.runtime.engine import Engine

    rcfg = resolve_dtype(rcfg, model_dir, say=say)
    cfg, weights, report = load_checkpoint(model_dir, rcfg.torch_dtype, rcfg.weight_dtype)
    if report.quantized is not None:
        say(report.quantized.note)
    if rcfg.kv_dtype == "fp8":
        from moegen.runtime.kv.fp8 import NOTE

        say(NOTE)
    plan = None
    if user is not None:
        plan = plan_run(cfg, weights, rcfg, user, workload or workload_of(requests, rcfg), say)
        rcfg = plan.rcfg
        for line in format_plan(plan, alternatives=False).splitlines():
            say("plan: " + line)
    engine = Engine(cfg, weights, rcfg, generation_eos_ids(model_dir, cfg), trace=trace, trace_steps=trace_steps)
    engine.quantized = report.quantized
    if plan is not None and engine.trace is not None:
        engine.trace.record_plan(plan.to_json())
    return engine, plan
