"""What a run takes of device memory besides the weights, sized once at start-up (the runtime and the
planner both size through these, so a plan's device bytes are the run's): the KV staging slots, the
activations and step inputs of the largest step, and the transient memory of its launches.

Transient memory is what a launch allocates for its intermediates and frees when it ends. Under a
device budget every launch is held to a *workspace* (WORKSPACE_SHARE of the budget, at most
WORKSPACE_MAX): an expert launch takes at most so many tokens at a time, the router and a dense MLP
their step in chunks, the lm_head so many sequences per pass, and an attention micro-batch is cut
where its prompts padded to the longest, or its sequences' contexts, would take more (`LaunchSizes`).
The budget then reserves the most any one launch can take at those sizes (on the cpu's lanes, those
side by side together) plus the routing every MoE layer keeps until the step ends, so a run within
--gpu-memory never runs out mid-job. Each kind's bound is read off its code (models/, runtime/tasks/)
for the worst case: an expert may be routed every token of the step. Without a budget nothing is
reserved, and launches are as large as the step.

Letters: T the step's tokens, B sequences, b a micro-batch's, S context, H hidden, E experts, K top-k,
I expert width, W a dense/shared MLP's width, V vocab, N heads, G kv heads, D head dim; s bytes per
element of the run dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moegen.config import MLAConfig, ModelConfig
from moegen.models.kv_cache import kv_bytes_per_token
from moegen.models.linear import ROWS_BUCKET
from moegen.models.weights import ModelWeights
from moegen.runtime.backend import DeviceBudgetError
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.cpu_threads import LANE_FLOPS, cpu_lanes
from moegen.runtime.kv.fp8 import scale_bytes, staged_element_bytes
from moegen.runtime.kv.staging import staging_device_numel
from moegen.runtime.residency import minimum_device_bytes
from moegen.runtime.step_inputs import step_input_bytes
from moegen.units import format_bytes

F32, I64 = 4, 8
WORKSPACE_SHARE = 1 / 8  # of the device budget, for any one launch's transient memory
WORKSPACE_MAX = 2 * 2**30
MLP_TEMP_BYTES = 64 * 2**20  # without a budget: bound on a dense MLP chunk's [tokens, width] intermediate
HEAD_TEMP_BYTES = 128 * 2**20  # without a budget: bound on one lm_head pass's logits and sampling buffers


@dataclass(slots=True)
class LaunchSizes:
    """How much one launch of each kind takes at a time, so that its transient memory fits `workspace`."""

    workspace: int | None  # bytes one launch may allocate; None: no device budget, launches as large as the step
    expert_tokens: int | None  # tokens per expert launch (None: all of an expert's; --expert-micro-batch caps too)
    mlp_tokens: dict[int, int]  # dense/shared MLP width -> tokens per chunk (`mlp_chunk`)
    router_tokens: int | None  # tokens per routing chunk (None: the whole step at once)
    head_rows: tuple[int, int]  # sequences per lm_head pass: greedy, drawing
    cfg: ModelConfig
    dtype_size: int
    group_tokens: int | None = None  # picks per grouped expert launch (None: unbounded), within what one launch's
    # transient memory is reserved for already

    def mlp_chunk(self, width: int) -> int:
        """Tokens per chunk of a dense/shared MLP launch of this width."""
        if width not in self.mlp_tokens:  # (a width the config doesn't name: sized as it comes)
            self.mlp_tokens[width] = _mlp_tokens(width, self.cfg.hidden_size, self.dtype_size, self.workspace)
        return self.mlp_tokens[width]

    def attention_fits(self, sequences: int, longest: int, context: int) -> bool:
        """Whether one attention launch over `sequences` (at most `longest` new tokens each, over at most
        `context` positions) stays within the workspace."""
        b = sequences
        return self.workspace is None or _attention(self.cfg, self.dtype_size, b, b * longest, b * context,
                                                    b * longest * context, longest == 1) <= self.workspace


def launch_sizes(cfg: ModelConfig, rcfg: RuntimeConfig, budget: int | None, max_step_tokens: int, micro_batch: int,
                 batch: int) -> LaunchSizes:
    """Each launch kind's size for a run of `rcfg` under the device `budget` (bytes, None: unbounded). The
    workspace is WORKSPACE_SHARE of the budget (at most WORKSPACE_MAX, at least what a launch takes at its
    smallest), unless the step's launches need less at their full sizes: then they run at those."""
    s, H = _size(rcfg), cfg.hidden_size
    widths = {w for w in (cfg.dense_intermediate, cfg.moe.shared_intermediate) if w}
    whole = LaunchSizes(None, rcfg.expert_micro_batch, {w: _mlp_tokens(w, H, s, None) for w in widths}, None,
                        head_rows(cfg, s, HEAD_TEMP_BYTES), cfg, s)
    if budget is None:
        return whole
    needed = _largest_launch(cfg, rcfg, whole, max_step_tokens, micro_batch, batch)
    share = min(WORKSPACE_MAX, int(budget * WORKSPACE_SHARE))
    if needed <= share:
        sizes = dataclasses.replace(whole, workspace=needed)
    else:
        workspace = max(minimum_workspace(cfg, rcfg), share)
        expert = _tokens(lambda t: _expert(t, H, cfg.moe.expert_intermediate, s), workspace)
        if rcfg.expert_micro_batch:
            expert = min(expert, rcfg.expert_micro_batch)
        sizes = LaunchSizes(workspace, expert, {w: _mlp_tokens(w, H, s, workspace) for w in widths},
                            _tokens(lambda t: _router(cfg, t, s), workspace), head_rows(cfg, s, workspace), cfg, s)
    sizes.group_tokens = _group_tokens(cfg, rcfg, sizes, _largest_launch(cfg, rcfg, sizes, max_step_tokens,
                                                                         micro_batch, batch), max_step_tokens)
    return sizes


def _group_tokens(cfg: ModelConfig, rcfg: RuntimeConfig, sizes: LaunchSizes, reserved: int, T: int) -> int:
    """Picks per grouped expert launch (`tasks.expert_groups`) that keep it, or the cpu lanes' groups side by
    side, within the `reserved` bytes of the step's largest launch: the group's rows gathered [P, H], scaled in
    place, their tokens and weights [P], beside its largest member's launch at `sizes` (0: none fit, no groups)."""
    s, H, I = sizes.dtype_size, cfg.hidden_size, cfg.moe.expert_intermediate
    lanes = cpu_lanes() if rcfg.device == "cpu" else 1
    member = _expert(min(T, sizes.expert_tokens or T), H, I, s)
    return max(0, (reserved // lanes - member) // (H * s + I64 + F32 + s))


def _mlp_tokens(width: int, H: int, s: int, workspace: int | None) -> int:
    """Tokens per dense/shared MLP chunk: within the workspace, or without one [t, W] under MLP_TEMP_BYTES."""
    if workspace is None:
        return max(256, MLP_TEMP_BYTES // (width * s))
    return _tokens(lambda t: _mlp(t, H, width, s), workspace)


def minimum_workspace(cfg: ModelConfig, rcfg: RuntimeConfig) -> int:
    """The least workspace every launch fits at its smallest: one token, one sequence at the longest context."""
    s, H, S = _size(rcfg), cfg.hidden_size, rcfg.max_seq_len
    W = max(cfg.dense_intermediate, cfg.moe.shared_intermediate)
    return max(_expert(1, H, cfg.moe.expert_intermediate, s), _mlp(1, H, W, s), _router(cfg, 1, s),
               attention_bytes(cfg, s, [1], [S - 1]), attention_bytes(cfg, s, [S], [0]),
               _rms(1, H, s) + cfg.vocab_size * (_DRAW_ROW + s))


def transient_bytes(cfg: ModelConfig, rcfg: RuntimeConfig, sizes: LaunchSizes, max_step_tokens: int,
                    micro_batch: int, batch: int) -> int:
    """The most transient memory the largest step takes at once: its worst launch at `sizes` (on the cpu's
    lanes, the ones side by side together) and the routing every MoE layer keeps for the step (picks sorted
    by expert, weights, counts), with the sort's buffers while it runs."""
    T, K = max_step_tokens, cfg.moe.router.top_k
    routing = sum(cfg.moe_layers) * (T * K * (I64 + F32) + cfg.moe.router.num_experts * I64) + 4 * T * K * I64
    return _largest_launch(cfg, rcfg, sizes, max_step_tokens, micro_batch, batch) + routing


def _largest_launch(cfg: ModelConfig, rcfg: RuntimeConfig, sizes: LaunchSizes, T: int, micro_batch: int,
                    batch: int) -> int:
    """The most one launch of the step (or the cpu lanes' side-by-side ones together) allocates at `sizes`."""
    s, H, S = sizes.dtype_size, cfg.hidden_size, rcfg.max_seq_len
    I = cfg.moe.expert_intermediate
    t = min(T, sizes.expert_tokens or T)
    mlps = [_mlp(min(T, c), H, w, s) for w, c in sizes.mlp_tokens.items()]
    b = min(micro_batch, batch)
    # prompts: padded to at most T tokens (`step.micro_batches`), each key length its own query length;
    # decode: b sequences at the longest context. Under a budget a micro-batch is cut to the workspace.
    prompt_tokens, longest = min(T, b * S), min(S, T)
    attention = max(_attention(cfg, s, b, prompt_tokens, prompt_tokens, prompt_tokens * longest, decode=False),
                    _attention(cfg, s, b, b, b * S, b * S, decode=True))
    if sizes.workspace is not None:
        attention = min(attention, sizes.workspace)
    greedy, drawn = sizes.head_rows
    head = max(_rms(min(batch, greedy), H, s) + min(batch, greedy) * cfg.vocab_size * (_GREEDY_ROW + s),
               _rms(min(batch, drawn), H, s) + min(batch, drawn) * cfg.vocab_size * (_DRAW_ROW + s)) + batch * I64
    alone = max(_expert(t, H, I, s), *mlps, _router(cfg, min(T, sizes.router_tokens or T), s), attention, head,
                T * H * s)  # the last: a device embedding lookup
    lanes = cpu_lanes() if rcfg.device == "cpu" else 1
    side_by_side = lanes * max(_expert(min(t, _lane_tokens(H, I)), H, I, s),
                               *(_mlp(min(T, c, _lane_tokens(H, w)), H, w, s) for w, c in sizes.mlp_tokens.items()))
    return max(alone, side_by_side)


def attention_bytes(cfg: ModelConfig, s: int, q_lens: list[int], past_lens: list[int]) -> int:
    """An upper bound of one attention launch's transient memory over these sequences."""
    b, Qm = len(q_lens), max(q_lens)
    S = max(p + q for p, q in zip(past_lens, q_lens))
    return _attention(cfg, s, b, b * Qm, b * S, b * Qm * S, decode=Qm == 1)


def _attention(cfg: ModelConfig, s: int, b: int, tokens: int, kv_rows: int, positions: int, decode: bool) -> int:
    """One attention launch of b sequences: `tokens` new ones padded to the longest (b x Qm), `kv_rows` keys
    of each sequence's context padded to the longest (b x S'), `positions` (query, key) pairs (b x Qm x S')."""
    a, H = cfg.attention, cfg.hidden_size
    mask = positions * (3 + s) + tokens * 3 * I64  # visible, window, padding fix; as the kernel's float mask
    if isinstance(a, MLAConfig):
        N, P, R, V, C = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        q_lora = a.q_lora_rank or 0
        per_token = (q_lora + N * (P + R) + C + R + 4 * N * R + N * (V + H)) * s + _rms(1, q_lora + C, s)
        if decode:  # absorbed: q in latent space, scores [b, N, S'] in the run dtype then float32, out
            return tokens * per_token + b * N * (2 * C + V) * s + kv_rows * N * (3 * s + 5 * F32) + mask
        # expanded: k_nope, values (padded to P+R), keys [b, N, S', ...]; queries and output [b, N, Qm, P+R]
        return tokens * per_token + kv_rows * N * (P + 2 * (P + R)) * s + tokens * N * (2 * (P + R) * s + F32) + mask
    N, G, D = a.num_heads, a.num_kv_heads, a.head_dim
    per_token = _rms(1, H, s) + H * s + (N + 2 * G) * D * s * 3 + 4 * (N + G) * D * s + (N * D + H) * s
    if decode:  # K/V gathered where they are not staged, the output and its log-sum-exp
        return tokens * per_token + 2 * kv_rows * G * D * s + b * N * (D * s + F32) + mask
    # prompts: queries padded [b, Qm, N, D], K/V repeated to N heads (cuda), the kernel's output, log-sum-exp
    return tokens * per_token + 2 * kv_rows * N * D * s + tokens * N * (2 * D * s + F32) + mask


def step_tokens(rcfg: RuntimeConfig, batch: int) -> int:
    """The most tokens in one step: B-1 decode tokens and one longest prompt always fit, never more than
    every row's whole context."""
    S = rcfg.max_seq_len
    return min(batch * S, max(rcfg.max_step_tokens, batch - 1 + S))


def staging_bytes(cfg: ModelConfig, rcfg: RuntimeConfig, micro_batch: int, max_step_tokens: int) -> int:
    """Device bytes of the KV staging slots (`kv.staging`): one layer's KV of a micro-batch and its new entries, twice
    (with --kv-dtype fp8 in e4m3 and again in the run dtype, the launch's work buffers, and the scales)."""
    S = rcfg.max_seq_len
    numel = staging_device_numel(cfg.attention, micro_batch, S, min(max_step_tokens, micro_batch * S), rcfg.kv_block_size)
    return numel * staged_element_bytes(rcfg) + scale_bytes(cfg, rcfg)


def activation_bytes(cfg: ModelConfig, rcfg: RuntimeConfig, max_step_tokens: int, batch: int) -> int:
    """The residual stream, router input and expert-output sum of the largest step, and the device copy of
    its inputs (`StepInputs`: token ids, index and sampling tensors) for up to `batch` sequences."""
    return max_step_tokens * 3 * cfg.hidden_size * _size(rcfg) + step_input_bytes(batch, max_step_tokens)


def model_batch_size(cfg: ModelConfig, rcfg: RuntimeConfig, weights: ModelWeights, budget: int | None) -> int:
    """--batching model: the largest B (up to --batch-size) whose device KV, activations and transient memory
    fit beside the smallest weight placement (within the device `budget`, bytes)."""
    if budget is None:
        return rcfg.batch_size
    free = budget - minimum_device_bytes(weights, rcfg.torch_dtype, rcfg.expert_slots)
    per_seq = rcfg.max_seq_len * kv_bytes_per_token(cfg, rcfg.torch_dtype)
    for B in range(rcfg.batch_size, 0, -1):
        T = step_tokens(rcfg, B)
        sizes = launch_sizes(cfg, rcfg, budget, T, B, B)
        if B * per_seq + activation_bytes(cfg, rcfg, T, B) + transient_bytes(cfg, rcfg, sizes, T, B, B) <= free:
            return B
    raise DeviceBudgetError(
        f"--batching model: not even one sequence's KV ({per_seq / 2**20:.1f} MiB for --max-seq-len "
        f"{rcfg.max_seq_len}) fits in --gpu-memory {format_bytes(budget)} beside the weights and a launch's "
        "transient memory; raise --gpu-memory or lower --max-seq-len")


# -- each launch kind's bound (bytes) -------------------------------------------------------------

_GREEDY_ROW = F32 + I64  # per vocab entry of a greedy row, beyond its logits in the run dtype
_DRAW_ROW = 8 * F32 + 3 * I64 + 3  # ... of a drawing row: its sort, masks, probabilities, float64 cdf


def head_rows(cfg: ModelConfig, s: int, room: int = HEAD_TEMP_BYTES) -> tuple[int, int]:
    """(sequences per lm_head pass, per drawing pass) within `room` bytes, s bytes per element; above
    ROWS_BUCKET a multiple of it (the cpu pads to one)."""
    def rows(per_entry: int) -> int:
        n = max(1, (room - _rms(1, cfg.hidden_size, s)) // (cfg.vocab_size * per_entry))
        return n if n <= ROWS_BUCKET else n // ROWS_BUCKET * ROWS_BUCKET

    return rows(_GREEDY_ROW + s), rows(_DRAW_ROW + s)


def _tokens(cost, room: int) -> int:
    """The most tokens t (at least 1) with cost(t) <= room (cost grows with t)."""
    low, high = 1, 1
    while cost(high * 2) <= room and high < 2**30:
        high *= 2
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= room else (low, mid - 1)
    return low


def _padded(t: int) -> int:
    """Rows a linear runs at (`linear.bucket_rows`: padded past ROWS_BUCKET on the cpu)."""
    return t if t <= ROWS_BUCKET else -(-t // ROWS_BUCKET) * ROWS_BUCKET


def _lane_tokens(H: int, width: int) -> int:
    """The most tokens a SwiGLU launch of this shape takes and still runs on a lane (under LANE_FLOPS)."""
    return int(LANE_FLOPS // (2 * 3 * H * width)) + 1 if width else 0


def _expert(t: int, H: int, I: int, s: int) -> int:
    """expert_launch over t tokens: their rows gathered [t, H] and padded [t', H], gate and up [t', I],
    down [t', H]; token indices, slots, weights [t]."""
    return _padded(t) * (3 * H + 2 * I) * s + t * (H * s + 2 * I64 + F32 + s)


def _mlp(t: int, H: int, W: int, s: int) -> int:
    """One chunk of mlp_launch over t tokens: a SwiGLU of width W, its gate [t, 1] and gated output [t, H]."""
    return _padded(t) * (3 * H + 2 * W) * s + t * (H * s + 2 * s) if W else 0


def _rms(n: int, H: int, s: int) -> int:
    """rms_norm over n rows: reduced in float32 (the input cast, its square, the normalised rows) and back."""
    return n * H * (3 * F32 + 2 * s)


def _router(cfg: ModelConfig, t: int, s: int) -> int:
    """route_launch over a chunk of t tokens: the norm, then float32 logits, scores and masked choices [t, E],
    group scores, the top-k picks and weights [t, K]; the gate in float32."""
    H, E, K = cfg.hidden_size, cfg.moe.router.num_experts, cfg.moe.router.top_k
    route = t * H * F32 + E * H * F32 + t * E * (6 * F32 + 2) + t * cfg.moe.router.n_group * 30 \
        + t * K * 6 * (F32 + I64)
    return max(_rms(t, H, s), route)


def _size(rcfg: RuntimeConfig) -> int:
    return torch.empty((), dtype=rcfg.torch_dtype).element_size()
