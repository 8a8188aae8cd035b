"""What the module tasks share during a run: the model on its backend, placement, KV, queues.

Sizing happens here once, at start-up: the batch (for --batching model, what fits the device),
the step's token budget, the KV staging buffers and activations, all reserved against the
device budget before any work.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moegen.config import ModelConfig
from moegen.models.kv_cache import LayerKV, allocate_kv, kv_bytes_per_token, kv_over, layer_kv_numel
from moegen.models.rope import Rope
from moegen.models.weights import ModelWeights, mlp_params
from moegen.runtime.backend import Backend, Event
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.device_memory import (activation_bytes, launch_sizes, model_batch_size, staging_bytes, step_tokens,
                                          transient_bytes)
from moegen.runtime.host_attention import worker as host_attention
from moegen.runtime.kv.sizing import host_kv_blocks, host_kv_bytes_per_token
from moegen.runtime.kv.block_pool import BlockPool
from moegen.runtime.kv.fp8 import KVFp8
from moegen.runtime.kv.manager import KVStats
from moegen.runtime.kv.staging import KVStager
from moegen.runtime.placement import Placement
from moegen.runtime.sampling import SamplingParams
from moegen.runtime.scheduler import StepPlan
from moegen.runtime.step import Routing, Step, micro_batches
from moegen.runtime.step_inputs import StepInputs, step_input_bytes

QUEUE_DEPTH = 4096  # bounded; far above what one step puts in flight per queue
STOP = object()  # put in every queue when the run ends


@dataclass(slots=True)
class EngineStats:
    """What the engine did, over its life."""

    steps: int = 0
    generated_tokens: int = 0  # sampled so far (live: read by progress lines from another thread)
    tokens_per_step: list[int] = field(default_factory=list)  # prompt + decode tokens of each step
    sequences_per_step: list[int] = field(default_factory=list)  # sequences in flight in each step
    expert_counts: list[list[int]] = field(default_factory=list)  # tokens per expert, per (step, MoE layer)
    kv: KVStats | None = None  # the KV cache's blocks, prefix hits and preemptions
    host_attended: int = 0  # decode tokens whose attention ran on the host (--cpu-attention), each counted once
    step_log: list[tuple[float, int, int]] = field(default_factory=list)  # per step: (seconds, decode sequences,
    # prompt tokens), for the progress line's ETA and plan check
    running: tuple[list[int], int] = ((), 0)  # after the last step: tokens of cap left of each sequence in flight,
    # and their caps (replaced whole each step: a reader in another thread sees one step's)


@dataclass(slots=True)
class Queues:
    embed: asyncio.Queue
    head: asyncio.Queue
    prefetch: asyncio.Queue
    attn: list[asyncio.Queue]
    router: list[asyncio.Queue]
    combine: list[asyncio.Queue]
    mlp: list[asyncio.Queue | None]
    expert: list[list[asyncio.Queue]]

    def all(self) -> list[asyncio.Queue]:
        flat = [self.embed, self.head, self.prefetch]
        for group in (self.attn, self.router, self.combine, self.mlp):
            flat += [q for q in group if q is not None]
        for per_layer in self.expert:
            flat += per_layer
        return flat


class Runtime:
    """Everything the module tasks share for one run: model, backend, placement, KV, queues."""

    def __init__(self, cfg: ModelConfig, rcfg: RuntimeConfig, backend: Backend, weights: ModelWeights):
        self.cfg, self.rcfg, self.backend = cfg, rcfg, backend
        dtype = rcfg.torch_dtype
        S, H = rcfg.max_seq_len, cfg.hidden_size
        # module: KV in host memory, staged per attention micro-batch. model: one batch walks the whole
        # model with its KV on the device, so B is what fits there beside the weight slots.
        self.kv_on_device = rcfg.batching == "model"
        B = self.batch_size = (model_batch_size(cfg, rcfg, weights, backend.budget) if self.kv_on_device
                                 else rcfg.batch_size)
        # The KV cache in blocks: on the device one block of S positions per sequence (a row); in host memory
        # --kv-block-size tokens each, as many as --host-kv-memory holds (by default B sequences of S).
        self.kv_block_size = S if self.kv_on_device else rcfg.kv_block_size
        self.kv_blocks = B if self.kv_on_device else host_kv_blocks(cfg, rcfg, B)
        self.kv_pool = BlockPool(self.kv_blocks)
        self.micro_batch = B if self.kv_on_device else min(rcfg.attn_micro_batch, B)  # sequences per attention launch
        self.max_step_tokens = step_tokens(rcfg, B)
        # Attention reads staged KV unless it is on the device; where the "device" is host memory (the cpu
        # backend with no device budget) the staged buffers are host buffers and nothing is copied.
        self.stage_copies = not self.kv_on_device and not (backend.device.type == "cpu" and backend.budget is None)
        if self.kv_on_device:  # every row, every layer
            kv_bytes = B * S * kv_bytes_per_token(cfg, dtype)
        elif self.stage_copies:  # two staging slots of one layer's KV for a micro-batch, shared by all layers
            kv_bytes = staging_bytes(cfg, rcfg, self.micro_batch, self.max_step_tokens)
        else:
            kv_bytes = 0
        # --cpu-attention: that share of the decode sequences attends on the host; its q/k/v and outputs cross
        self.host_sequences = 0 if self.kv_on_device else math.ceil(rcfg.cpu_attention * B)
        kv_bytes += host_attention.device_bytes(cfg, self.host_sequences, dtype.itemsize)
        # How large each launch may be, and what the largest step's launches allocate and free at most
        self.sizes = launch_sizes(cfg, rcfg, backend.budget, self.max_step_tokens, self.micro_batch, B)
        self.transient_bytes = transient_bytes(cfg, rcfg, self.sizes, self.max_step_tokens, self.micro_batch, B)
        self.placement = Placement(backend, weights, dtype, kv_bytes + activation_bytes(cfg, rcfg, self.max_step_tokens, B)
                                   + self.transient_bytes, rcfg.expert_slots, rcfg.resident_experts)
        self.core = self.placement.core
        self.rope = Rope(cfg.attention.rope, device=backend.device)
        self.kv: list[LayerKV] = self._kv_cache(rcfg.kv_torch_dtype)  # every sequence in flight
        # --kv-dtype fp8: the scales (the config keeps it to --batching module, whose KV is staged)
        self.kv_fp8 = KVFp8.allocate(cfg, backend.device) if rcfg.kv_dtype == "fp8" else None
        # Two staging slots, so one micro-batch's KV comes in while the previous one computes.
        self.stager = None if self.kv_on_device else KVStager.allocate(
            backend, cfg.attention, self.kv, self.kv_block_size, self.micro_batch, S,
            min(self.max_step_tokens, self.micro_batch * S), dtype, copies=self.stage_copies, fp8=self.kv_fp8)
        self.host_attention = host_attention.HostAttention.allocate(
            backend, cfg, self.kv, self.host_sequences, dtype, rcfg.cpu_attention_threads) if self.host_sequences else None
        self.h, self.x, self.out = (torch.empty(self.max_step_tokens, H, dtype=dtype, device=backend.device)
                                    for _ in range(3))
        self.step_inputs = StepInputs(backend, step_input_bytes(B, self.max_step_tokens))
        # Page-locked host buffers: the embedding rows of a step (when the lookup runs on the host), and
        # the two reads, each router's expert counts and the sampled ids.
        self.embed_rows = backend.host_buffer((self.max_step_tokens, H), weights.embed_tokens.dtype,
                                              "embedding rows") if self.placement.embed_on_host else None
        self.embed_copied: Event | None = None  # the last step's copy out of embed_rows
        self.counts_read = backend.host_buffer((cfg.num_layers, cfg.moe.router.num_experts), torch.int64, "router counts")
        self.ids_read = backend.host_buffer((B,), torch.int64, "sampled ids")
        self.stats = EngineStats(kv=KVStats(self.kv_blocks, self.kv_block_size,
                                            rcfg.prefix_sharing and not self.kv_on_device))
        self.queued: dict[str, int] = {}  # tokens waiting per module type (traced runs only)
        self.queue_tracks = {kind: backend.recorder.counter_track(f"tokens waiting: {kind}")
                             for kind in ("attention", "router", "experts")} if backend.recorder is not None else {}
        # What lives in host memory for the run (pinned on cuda): the weight arena and the KV cache.
        self.host_bytes = sum(b.nbytes for b in self.placement.blocks.values()) + (
            0 if self.kv_on_device else self.kv_blocks * self.kv_block_size * host_kv_bytes_per_token(cfg, rcfg))
        backend.synchronize()  # start-up copies done before any stream reads them

    def _kv_cache(self, dtype: torch.dtype) -> list[LayerKV]:
        """The KV cache: B rows of S positions on the device (--batching model), else one host arena of
        blocks at its exact size, page-locked once, every layer a view of it as [blocks, block_size, ...]
        (zeroed: masked positions are still multiplied by zero probabilities, and stray NaN bits would
        survive that)."""
        n, size = self.kv_blocks, self.kv_block_size
        if self.kv_on_device:
            return allocate_kv(self.cfg, n, size, dtype, self.backend.device)
        numel = layer_kv_numel(self.cfg.attention, n, size) * self.cfg.num_layers
        return kv_over(self.cfg, n, size, self.backend.host_buffer((numel,), dtype, "the host KV cache").zero_())

    def close(self) -> None:
        """Drop the run's large buffers (KV cache, staging, activations, slots) when the engine closes, so a
        next engine in the same process reuses their memory; the weights stay with their owner."""
        self.kv, self.stager, self.kv_fp8, self.host_attention = [], None, None, None
        self.h = self.x = self.out = self.step_inputs = self.embed_rows = None
        self.placement.close()

    def new_queues(self) -> Queues:
        L, E = self.cfg.num_layers, self.cfg.moe.router.num_experts

        def q() -> asyncio.Queue:
            return asyncio.Queue(QUEUE_DEPTH)

        return Queues(
            embed=q(), head=q(), prefetch=q(),
            attn=[q() for _ in range(L)], router=[q() for _ in range(L)], combine=[q() for _ in range(L)],
            mlp=[q() for _ in range(L)],
            expert=[[q() for _ in range(E)] if self.core.routers[layer] is not None else [] for layer in range(L)],
        )

    # -- tracing (all no-ops when off) ----------------------------------------------------------

    @property
    def recorder(self):
        return self.backend.recorder

    def label(self, name: str, flows_in: tuple[int, ...] = (), flows_out: tuple[int, ...] = (), **args):
        """A slice label for a stream work item, or None when not tracing."""
        if self.backend.recorder is None:
            return None
        from moegen.trace.slices import Label

        return Label(name, args, flows_out=flows_out, flows_in=flows_in)

    def attention_label(self, layer: int, step: Step, mb, flows_in: tuple[int, ...], share: slice = slice(None)):
        """An attention launch's label: over the micro-batch `mb`, or over its sequences `share` (a launch on a lane)."""
        if self.backend.recorder is None:
            return None
        past, q = mb.past_lens[share], mb.q_lens[share]
        return self.label(f"attention[{layer}]", flows_in=flows_in, layer=layer, step=step.index,
                          micro_batch=mb.index, sequences=len(q), tokens=sum(q), cached=sum(past),
                          query_sq=sum(n * n for n in q))

    def waiting(self, kind: str, tokens: int) -> None:
        """Tokens queued in front of a module type (attention, router, experts): a trace counter."""
        if self.backend.recorder is None or not tokens:
            return
        self.queued[kind] = self.queued.get(kind, 0) + tokens
        self.backend.recorder.counter(self.queue_tracks[kind], self.queued[kind])

    def mark_unused_copy(self, module, flow: int) -> Event:
        """A weight copy nobody used (its expert got no tokens once routed): its flow ends on an empty
        marker queued on the copy stream itself, so it lands right after that copy in the trace."""
        from moegen.trace.slices import Label

        return self.backend.h2d_weights.submit(lambda: None, Label(f"unused {module}", {}, flows_in=(flow,)))

    @staticmethod
    def mlp_flops(w, tokens: int) -> int:
        """2 FLOPs per multiply-add over the three projections of a SwiGLU MLP."""
        return 2 * tokens * mlp_params(w)

    async def read(self, after: Event, get: Callable[[], Tensor], into: Tensor) -> Tensor:
        """A device tensor produced by the work ending at `after`, on the host (a named sync point): copied
        into the page-locked `into` (of its size) on the D2H stream after that work, and awaited; never a
        pageable copy, which the host would wait for inside the submitting call. Read it before the next
        read into the same buffer. On the cpu backend the tensor is in host memory already."""
        b = self.backend
        if b.device.type == "cpu":
            await b.wait(after)
            return get()
        b.d2h.wait_event(after)
        await b.wait(b.submit_copy(b.d2h, lambda: into.copy_(get(), non_blocking=True),
                                   into.numel() * into.element_size()))
        return into

    def new_step(self, plan: StepPlan) -> Step:
        """The step's state, its small tensors on the host (the embedding launch moves them)."""
        T = plan.num_tokens
        if T > self.max_step_tokens:
            raise ValueError(f"a step of {T} tokens exceeds the {self.max_step_tokens} planned for")
        seqs = plan.seqs
        sampling = SamplingParams(
            temperature=torch.tensor([s.request.temperature for s in seqs], dtype=torch.float32),
            top_k=torch.tensor([s.request.top_k for s in seqs], dtype=torch.int64),
            top_p=torch.tensor([s.request.top_p for s in seqs], dtype=torch.float32),
            seeds=torch.tensor([s.request.seed for s in seqs], dtype=torch.int64),
            counters=torch.tensor([len(s.result.token_ids) for s in seqs], dtype=torch.int64),
            greedy_only=all(s.request.temperature == 0 for s in seqs),
        )
        hot = [i for i, s in enumerate(seqs) if s.request.temperature > 0]
        cut = {seqs[i].request.top_k > 0 or seqs[i].request.top_p < 1 for i in hot}
        sampling.cuts = cut.pop() if len(cut) == 1 else None  # the same for every sampling row: known
        if 0 < len(hot) < len(seqs):
            sampling.rows = torch.tensor(hot, dtype=torch.int64)
        loop = asyncio.get_running_loop()
        return Step(
            plan=plan,
            micro=micro_batches(plan, self.micro_batch, self.kv_block_size, staged=not self.kv_on_device,
                                max_padded=self.max_step_tokens, host_share=self.rcfg.cpu_attention,
                                fits=self.sizes.attention_fits),
            h=self.h[:T], x=self.x, out=self.out,
            last_token=torch.tensor(plan.q_lens).cumsum(0) - 1,  # [B] each sequence's last token
            sampling=sampling,
            routing=[Routing() for _ in range(self.cfg.num_layers)],
            counts=[loop.create_future() for _ in range(self.cfg.num_layers)],
        )
