"""Stage 4's sizes, chosen at run time: layers, device budget, B, from the measured link, the host's
memory and disk, and each part's timeout.

The runtime's own functions size what they size (model_batch_size: the B model-based batching fits
on the device; kv_bytes_per_token; the Scheduler, run on fake tokens, for the steps a job takes),
over meta tensors of the checkpoint (nothing allocated). What is estimated here is only time:

    write  = weights / write GB/s                               (random bytes to disk, synced)
    mode   = (host bytes + weights) / load GB/s + STARTUP_S     (allocate and pin the host buffers,
                                                                 then copy the weights in from the files)
           + steps × streamed weights / link                    (every step streams what is not resident)
           + decode steps × B × context × KV bytes/token / link (module: the KV is staged every step)
           + 2 × B × prompt × active parameters / FLOP/s        (prefill compute)

with streamed = weights - budget for module-based batching (the budget's rest holds residents) and
weights - lm_head for model-based (its budget goes to KV). Host memory is the runtime's weight arena
and host KV cache, each page-locked at its exact size. The budget is raised, where it must be, to
what module-based batching needs at the least (the planner's own sizing, `planner.cost.setting`,
which raises where the runtime would). The largest layer count, and then the
largest B (BATCH_FACTORS × what model-based batching fits: it is then bound by its KV), whose
estimates fit TIME_SHARE of each part's timeout and whose weights + host KV fit the host is chosen.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from moegen.config import ModelConfig

HOST_CAP = 100 * 2**30  # weights + host KV: the rest of a 128 GiB host for page cache and the process
HOST_SHARE = 0.85  # of MemAvailable
DISK_MARGIN = 2 * 2**30
TIME_SHARE = 0.8  # of a part's timeout its estimate may use
BUDGET_SHARE = 0.35  # the device budget is at most this share of the weights: most of them stream
BATCH_FACTORS = (2.0, 1.5, 1.25)  # module-based B over what model-based batching fits
PROMPTS_PER_STEP = 64  # max_step_tokens = 64 prompts: admission takes a few steps, not B of them
STARTUP_S = 10.0  # process start, imports, CUDA init, engine start-up
FLOPS = {"cuda": 200e12, "cpu": 50e9}  # assumed bfloat16 FLOP/s for prefill (estimates only)
FIT_ALL = 4096  # model_batch_size searches B downwards from here


@dataclass(frozen=True, slots=True)
class Shape:
    """A Mixtral-like model's widths; the layer count is what sizing picks."""

    hidden: int
    expert_width: int
    heads: int
    kv_heads: int
    vocab: int

    def overrides(self, layers: int) -> dict:
        """config.json fields over specs.config_json("mixtral", "bench", ...)."""
        return {"hidden_size": self.hidden, "intermediate_size": self.expert_width, "num_hidden_layers": layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab}


MIXTRAL_8X7B = Shape(4096, 14336, 32, 8, 32000)
DRY = Shape(256, 896, 8, 2, 2048)  # --dry-run: ~11 MB a layer


@dataclass(frozen=True, slots=True)
class Budget:
    """What sizing reads from the machine and the options."""

    device: str
    link_gbps: float  # host->device (cuda: stage 2's; cpu: the simulated link)
    link_source: str  # where link_gbps came from
    host_available: int  # bytes, MemAvailable
    disk_free: int  # bytes under the work dir (after writing: unbounded)
    disk_in_memory: bool  # the work dir is tmpfs: the checkpoint's files take host memory too
    write_s: float  # part timeouts, seconds
    module_s: float
    model_s: float
    write_gbps: float  # assumed rates
    load_gbps: float


@dataclass(slots=True)
class OffloadPlan:
    """What the three parts of stage 4 run; written by the write part, read by the mode runs."""

    layers: int
    weight_bytes: int  # bfloat16, all tensors
    gpu_memory: int  # --gpu-memory of both modes, bytes
    batch: int  # B requested of both; module-based runs it, model-based fits what it can
    model_batch: int  # what model-based batching fits on the device (its B)
    prompt: int
    decode: int
    max_step_tokens: int
    admission_steps: int  # steps until every prompt of the batch is admitted (then pure decode)
    host_kv_bytes: int  # module-based batching's KV cache in host memory
    host_bytes: int  # what module-based batching holds in host memory (weight arena + KV cache), the larger
    link_gbps: float
    link_source: str
    estimate_s: dict  # write, module, model
    limits_s: dict  # TIME_SHARE of each part's timeout
    host_limit: int  # bytes weights + host KV may take
    fits: bool  # every estimate within its limit

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> OffloadPlan:
        return cls(**json.loads(path.read_text()))


def model_config(shape: Shape, layers: int) -> ModelConfig:
    """The ModelConfig of the Mixtral-shaped checkpoint at `layers`, without writing it."""
    from transformers import AutoConfig

    from moegen.checkpoints.specs import config_json
    from moegen.models.families import FAMILIES
    from moegen.models.hf_config import from_hf_config

    raw = config_json("mixtral", "bench", shape.vocab, 1, 2) | shape.overrides(layers)
    return from_hf_config(AutoConfig.for_model(raw.pop("model_type"), **raw), FAMILIES["mixtral"])


def choose(shape: Shape, most_layers: int, budget: Budget, gpu_memory: int, prompt: int, decode: int,
           batch: int | None = None, fixed_layers: bool = False) -> OffloadPlan:
    """The largest plan that fits (fewer layers first, then a smaller B); with `fixed_layers` (the
    checkpoint is written) only B changes, and the smallest B's plan is returned even if over time."""
    plan = None
    for layers in range(most_layers, 0 if not fixed_layers else most_layers - 1, -1):
        for factor in BATCH_FACTORS if batch is None else (None,):
            plan = candidate(shape, layers, budget, gpu_memory, prompt, decode, batch, factor)
            if plan is not None and plan.fits:
                return plan
    if plan is None:
        raise ValueError(f"no Mixtral-shaped model fits --gpu-memory {gpu_memory / 2**30:.2f} GiB "
                         f"(not even one sequence of {prompt + decode} tokens beside one layer's slots); raise it")
    return plan


def candidate(shape: Shape, layers: int, budget: Budget, gpu_memory: int, prompt: int, decode: int,
              batch: int | None, factor: float | None) -> OffloadPlan | None:
    """The plan at `layers` and B = `batch` or `factor` × model-based batching's; None where not even
    one sequence fits model-based batching's device budget."""
    from moegen.checkpoints.make import meta_checkpoint
    from moegen.models.kv_cache import kv_bytes_per_token
    from moegen.models.weights import mlp_params, tensors_of
    from moegen.runtime.backend import DeviceBudgetError
    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.device_memory import model_batch_size
    from moegen.runtime.residency import module_sizes

    cfg = model_config(shape, layers)
    tensors, weights = meta_checkpoint(cfg)
    weight_bytes = 2 * sum(t.numel() for t in tensors.values())
    gpu_memory = min(gpu_memory, int(BUDGET_SHARE * weight_bytes))
    seq = prompt + decode
    step_tokens = PROMPTS_PER_STEP * prompt
    for _ in range(8):  # a budget raised for module-based batching fits model-based a larger B: again
        rcfg = RuntimeConfig(device="cpu", dtype="bfloat16", batch_size=FIT_ALL, gpu_memory=gpu_memory,
                             max_seq_len=seq, batching="model", max_step_tokens=step_tokens)
        try:
            fit = model_batch_size(cfg, rcfg, weights, gpu_memory)
        except DeviceBudgetError:
            return None
        # ... but admitted within the first half of the decode steps, so the steps after run at full batch
        B = batch or max(fit + 1, min(math.ceil(factor * fit), PROMPTS_PER_STEP * (decode // 2)))
        needed = module_budget(cfg, weights, gpu_memory, B, seq, step_tokens, weight_bytes)
        if needed == gpu_memory:
            break
        gpu_memory = needed
    kv_token = kv_bytes_per_token(cfg, torch.bfloat16)
    host_kv = B * seq * kv_token
    model_host = sum(s.host for s in module_sizes(weights, torch.bfloat16).values())  # the host weight arena
    host_bytes = model_host + host_kv  # module-based: + the host KV cache
    admission, module_steps = scheduled_steps(B, prompt, decode, step_tokens)
    _, model_steps = scheduled_steps(fit, prompt, decode, step_tokens)
    link = budget.link_gbps * 1e9
    rate = budget.load_gbps * 1e9
    lm_head = 2 * weights.lm_head.numel()
    layer0 = weights.layers[0]
    # parameters each token multiplies by, per layer: attention and its top-k experts
    active = sum(t.numel() for t in tensors_of(layer0.attn)) + cfg.moe.router.top_k * mlp_params(layer0.moe.experts[0])
    flops = FLOPS[budget.device]
    estimate = {
        "write": weight_bytes / (budget.write_gbps * 1e9),
        "module": STARTUP_S + (host_bytes + weight_bytes) / rate + module_steps * max(weight_bytes - gpu_memory, 0) / link
                  + (module_steps - admission) * B * (prompt + decode / 2) * kv_token / link
                  + 2 * B * prompt * active * layers / flops,
        "model": STARTUP_S + (model_host + weight_bytes) / rate + model_steps * (weight_bytes - lm_head) / link
                 + 2 * fit * prompt * active * layers / flops,
    }
    limits = {"write": TIME_SHARE * budget.write_s, "module": TIME_SHARE * budget.module_s,
              "model": TIME_SHARE * budget.model_s}
    host_limit = int(min(HOST_CAP, HOST_SHARE * budget.host_available))
    in_memory = weight_bytes if budget.disk_in_memory else 0
    fits = (all(estimate[k] <= limits[k] for k in limits) and host_bytes + in_memory <= host_limit
            and weight_bytes <= budget.disk_free - DISK_MARGIN)
    return OffloadPlan(layers, weight_bytes, gpu_memory, B, fit, prompt, decode, step_tokens, admission, host_kv,
                       host_bytes, budget.link_gbps, budget.link_source, {k: round(v, 1) for k, v in estimate.items()},
                       {k: round(v, 1) for k, v in limits.items()}, host_limit, fits)


def module_budget(cfg: ModelConfig, weights, gpu_memory: int, batch: int, seq: int, step_tokens: int,
                  weight_bytes: int) -> int:
    """`gpu_memory`, or the least multiple of 1.25 of it up to the weights' bytes that module-based batching
    at B = `batch` can run in (core, KV staging, activations, transient memory and two slots per kind)."""
    from moegen.planner.calibrate import Machine
    from moegen.planner.cost import ModelFacts, setting
    from moegen.runtime.backend import DeviceBudgetError
    from moegen.runtime.config import RuntimeConfig

    facts = ModelFacts.of(cfg, weights, torch.bfloat16)
    machine = Machine(link_h2d_gbps=1.0, link_d2h_gbps=1.0, memcpy_gbps=1.0, launch_s=0.0, sync_s=0.0)
    while True:
        rcfg = RuntimeConfig(device="cpu", dtype="bfloat16", batch_size=batch, gpu_memory=gpu_memory, max_seq_len=seq,
                             max_step_tokens=step_tokens)
        try:
            setting(facts, rcfg, machine, gpu_memory)
            return gpu_memory
        except DeviceBudgetError:
            if gpu_memory >= weight_bytes:
                raise
            gpu_memory = min(weight_bytes, int(gpu_memory * 1.25))


def scheduled_steps(batch: int, prompt: int, decode: int, step_tokens: int) -> tuple[int, int]:
    """(steps until all `batch` prompts are admitted, steps of the whole job), from the runtime's
    Scheduler on fake tokens."""
    from moegen.runtime.kv.block_pool import BlockPool
    from moegen.runtime.kv.manager import KVManager, KVStats
    from moegen.runtime.requests import Request
    from moegen.runtime.scheduler import Scheduler

    size = 16  # the run's prompts differ (no shared prefix), and its KV holds every sequence's worst case
    blocks = batch * -(-(prompt + decode) // size)
    kv = KVManager(BlockPool(blocks), size, KVStats(blocks, size, prefix_sharing=False), decode)
    scheduler = Scheduler([Request([1] * prompt, decode, ignore_eos=True) for _ in range(batch)], batch, (), step_tokens,
                          kv)
    admission = None
    while (plan := scheduler.next_step()) is not None:
        if admission is None and not scheduler.waiting:
            admission = plan.index + 1
        scheduler.finish_step(plan, [3] * len(plan.seqs))
    return admission or 0, scheduler.steps

