"""Router, experts and the combine step of an MoE layer.

The router picks K experts per token; each expert is a SwiGLU MLP run over the tokens routed to
it; the combine step sums weighted expert outputs (plus the shared expert) per token. The
runtime calls these units separately (one launch per expert over all its tokens); `moe_block`
strings them together for the reference model.

Letters: T tokens, H hidden, E experts, K top-k, I expert width, Gr expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moegen.config import MoEConfig, RouterConfig
from moegen.models.linear import bucket_rows, linear
from moegen.models.weights import MLPWeights, MoEWeights, RouterWeights


@dataclass(slots=True)
class Routing:
    experts: Tensor  # [T, K] int64: chosen experts
    weights: Tensor  # [T, K] float32: their combine weights


def mlp(w: MLPWeights, x: Tensor) -> Tensor:
    """SwiGLU: x [t, H] -> down(silu(gate x) * up x) [t, H]. One expert, the shared expert, or a dense MLP.
    The [t, I] intermediates are written in place, and x is padded once for the three linears: at an
    8k-token prefill step's ~2,000 tokens per expert, fresh [t, I] buffers cost more in page faults
    than the copies they replace."""
    rows = bucket_rows(x, w.gate_proj)  # [t', H]
    h = F.silu(linear(rows, w.gate_proj), inplace=True).mul_(linear(rows, w.up_proj))  # [t', I]
    return linear(h, w.down_proj)[: len(x)]


def route(w: RouterWeights, cfg: RouterConfig, x: Tensor) -> Routing:
    """x [T, H] -> the K experts of each token and their weights (in float32)."""
    logits = F.linear(x.float(), w.gate.float())  # [T, E]
    if cfg.scoring == "sigmoid":  # DeepSeek-V3: the bias steers selection, weights come from raw scores
        scores = logits.sigmoid()
        choice = scores if w.e_score_correction_bias is None else scores + w.e_score_correction_bias.float()
        if cfg.n_group > 1:
            group_score = choice.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group).topk(2, dim=-1).values.sum(-1)
            choice = _keep_top_groups(choice, group_score, cfg, fill=float("-inf"))
        experts = choice.topk(cfg.top_k, dim=-1, sorted=False).indices  # [T, K]
        weights = scores.gather(1, experts)  # [T, K]
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    else:
        scores = logits.softmax(dim=-1)  # [T, E]
        if cfg.topk_method == "group_limited_greedy":  # DeepSeek-V2: a group scores its best expert
            group_score = scores.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group).amax(dim=-1)
            scores = _keep_top_groups(scores, group_score, cfg, fill=0.0)
        weights, experts = scores.topk(cfg.top_k, dim=-1)  # [T, K]
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
    return Routing(experts=experts, weights=weights * cfg.routed_scaling_factor)


def _keep_top_groups(scores: Tensor, group_score: Tensor, cfg: RouterConfig, fill: float) -> Tensor:
    """scores [T, E] with experts outside each token's topk_group best groups set to `fill`."""
    top_groups = group_score.topk(cfg.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, top_groups, True)  # [T, Gr]
    keep = keep.repeat_interleave(cfg.num_experts // cfg.n_group, dim=1)  # [T, E]
    return scores.masked_fill(~keep, fill)


def moe_block(w: MoEWeights, cfg: MoEConfig, x: Tensor) -> Tensor:
    """x [T, H] -> routed experts' weighted sum plus the shared expert [T, H] (reference path)."""
    routing = route(w.router, cfg.router, x)
    routed = torch.zeros_like(x)
    for expert, tokens, slot in tokens_per_expert(routing, cfg.router.num_experts):
        y = mlp(w.experts[expert], x[tokens]) * routing.weights[tokens, slot, None].to(x.dtype)  # [t, H]
        routed.index_add_(0, tokens, y)
    return combine_shared(w, x, routed)


def tokens_per_expert(routing: Routing, num_experts: int):
    """Yields (expert, token indices [t], top-k slot [t]) for each expert that received tokens.
    One host sync (the counts), as the runtime's router→expert hand-off has."""
    flat = routing.experts.flatten()  # [T*K]
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # sync: expert batch sizes
    k = routing.experts.shape[1]
    start = 0
    for expert, count in enumerate(counts):
        if count:
            picks = order[start : start + count]
            yield expert, picks // k, picks % k
        start += count


def combine_shared(w: MoEWeights, x: Tensor, routed: Tensor) -> Tensor:
    """routed [T, H] plus the shared expert(s) of x [T, H], gated on Qwen2-MoE."""
    if w.shared is None:
        return routed
    shared = mlp(w.shared, x)
    if w.shared_expert_gate is not None:
        shared = torch.sigmoid(F.linear(x, w.shared_expert_gate)) * shared
    return routed + shared
