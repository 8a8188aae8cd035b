"""The runtime's knobs. Each field is one CLI flag of the same name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Backend: `cuda` (torch streams and events) or `cpu` (worker threads; can simulate a device); `auto`
    becomes cuda where torch sees a GPU and no link is simulated, else cpu, when the config is made."""
    dtype: str = "float32"
    """Compute and weight dtype on the device: float32, bfloat16 or float16; `auto` is decided against the
    checkpoint (`auto.resolve_dtype`: its own dtype on cuda, float32 on cpu)."""
    weight_dtype: str = "auto"
    """How linear weights are kept in host memory and on the link: `auto` as the checkpoint stores them (FP8
    block-scaled checkpoints stay FP8), `fp8` the routed experts quantized to FP8 at load, `fp8-all` every
    linear but the routers and lm_head (`formats.weight_dtype`; lossy, opt-in)."""
    kv_dtype: Literal["auto", "fp8"] = "auto"
    """How the host KV cache and its staging hold keys and values: `auto` in the run dtype, `fp8` in e4m3 with
    float32 scales fixed by the first prefill of each layer (`runtime.kv.fp8`): half of bf16's bytes on the
    host and the link (lossy, opt-in; --batching module only)."""
    batch_size: int = 256
    """B: sequences in flight. Finished ones are replaced by waiting prompts at once. Larger B gives each
    expert more tokens per launch (on 2 cpu cores: 64 -> 256 sequences took the bench Mixtral from 227 to
    308 generated tok/s)."""
    attn_micro_batch: int = 256
    """Sequences per attention launch (bounds the device's KV staging buffers). Small launches are
    dominated by per-launch overhead: 16 -> 256 took the bench Mixtral from 308 to 336 tok/s on cpu."""
    expert_micro_batch: int | None = None
    """Most tokens in one expert launch; None = all of an expert's tokens in one launch."""
    expert_groups: bool = True
    """Run a layer's resident experts that have tokens in a few grouped launches (`tasks.expert_groups`): one
    gather, each member's matmuls, one add; on the cpu two groups per compute lane. Streamed experts run alone."""
    expert_slots: int | None = None
    """Experts whose weights may be on the device at once (≥ 1; ≥ 2 overlaps copy and compute); None = what fits."""
    resident_experts: int | None = None
    """Routed experts kept on the device for the whole run (the first ones in layer order; 0 streams them
    all); None = what fits beside the minimum slots (none when --expert-slots is set)."""
    gpu_memory: int | None = None
    """Device memory budget in bytes; None = unlimited (cpu) or the device's free memory (cuda)."""
    host_kv_memory: int | None = None
    """Host bytes for the KV cache of all sequences in flight (bounds its blocks, not B: sequences hold what they
    use); None = what B sequences of max_seq_len need."""
    kv_block_size: int = 16
    """Tokens per block of the paged host KV cache: sequences take blocks as they grow and return them when they
    finish; identical leading full blocks of prompts are stored once. 16: decode tok/s was flat within noise from
    4 to 128 (`python -m tools.kv_block_size`: 265-293 tok/s on the bench Mixtral, 2 cpu cores, staged and in
    place) while the half-empty last block's share of the KV grows with the size (6% at 16, 36% at 128, for
    112-token contexts) and shared prefixes are found only in whole blocks."""
    prefix_sharing: bool = True
    """Store identical leading full KV blocks of prompts once and prefill them once (`--no-prefix-sharing`: off)."""
    max_seq_len: int = 2048
    """Longest prompt + completion a sequence may reach (sizes each KV row)."""
    max_step_tokens: int = 8192
    """Most tokens in one step (decode tokens + admitted prompts); sizes the activation buffers.
    Raised to batch_size - 1 + max_seq_len if lower, so any prompt can always join a step."""
    batching: Literal["module", "model"] = "module"
    """module: attention in micro-batches, each expert once per layer over the whole batch.
    model: one batch walks the whole model (the published baselines' policy)."""
    cpu_attention: float = 0.0
    """Share (0-1) of each decode step's sequences whose attention runs on host threads straight over the host KV
    cache (`runtime.host_attention`): only their q, new k/v and attention output cross the link, none of their
    KV is staged. Prefill attention stays on the device; --batching module only. Planned when unset."""
    cpu_attention_threads: int | None = None
    """Threads of the host attention worker; None = torch's intra-op default."""
    sim_link_gbps: float | None = None
    """cpu backend: pace host->device copies to this bandwidth (GB/s) to simulate a PCIe link."""

    def __post_init__(self):
        from moegen.runtime.auto import resolve_device

        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        object.__setattr__(self, "device", resolve_device(self.device, self.sim_link_gbps))  # frozen: once, here
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        from moegen.formats.weight_dtype import WEIGHT_DTYPES

        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"--weight-dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.weight_dtype!r}")
        for name in ("batch_size", "attn_micro_batch", "max_seq_len", "max_step_tokens", "kv_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.resident_experts is not None and self.resident_experts < 0:
            raise ValueError(f"--resident-experts must be at least 0, got {self.resident_experts}")
        for name in ("expert_micro_batch", "expert_slots", "gpu_memory", "host_kv_memory"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.batching not in ("module", "model"):
            raise ValueError(f"--batching must be module or model, got {self.batching!r}")
        if self.kv_dtype not in ("auto", "fp8"):
            raise ValueError(f"--kv-dtype must be auto or fp8, got {self.kv_dtype!r}")
        if self.kv_dtype == "fp8" and self.batching == "model":
            raise ValueError("--kv-dtype fp8 quantizes the paged host KV cache, which --batching model does not use "
                             "(its KV stays on the device in the run dtype): use --batching module or --kv-dtype auto")
        if not 0 <= self.cpu_attention <= 1:
            raise ValueError(f"--cpu-attention is a share of the decode sequences, 0 to 1, got {self.cpu_attention}")
        if self.cpu_attention > 0 and self.batching == "model":
            raise ValueError("--cpu-attention runs attention over the host KV cache, which --batching model does not "
                             "use (its KV stays on the device): use --batching module or --cpu-attention 0")
        if self.cpu_attention > 0 and self.kv_dtype == "fp8":
            raise ValueError("--cpu-attention does not read an FP8 KV cache yet: use --kv-dtype auto with it")
        if self.cpu_attention_threads is not None and self.cpu_attention_threads < 1:
            raise ValueError(f"--cpu-attention-threads must be at least 1, got {self.cpu_attention_threads}")
        if self.sim_link_gbps is not None and (self.device != "cpu" or self.sim_link_gbps <= 0):
            raise ValueError(f"--sim-link-gbps {self.sim_link_gbps}: "
                             + (f"simulates a link for --device cpu only, not --device {self.device}; use --device cpu "
                                "or drop --sim-link-gbps" if self.device != "cpu" else
                                "must be a positive bandwidth (GB/s); raise it or drop --sim-link-gbps"))

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            raise ValueError("dtype auto is decided against a checkpoint: pass the config through "
                             "moegen.runtime.auto.resolve_dtype(rcfg, model_dir) first, or give a dtype")
        return DTYPES[self.dtype]

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        """The dtype the host KV cache and the staging buffers hold (the link carries it)."""
        from moegen.formats.fp8 import FP8

        return FP8 if self.kv_dtype == "fp8" else self.torch_dtype
