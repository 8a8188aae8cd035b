"""Balance the routers of a random model so that every expert receives tokens.

Random router weights route unevenly: with 256 experts and 100 tokens some experts would never
run, and a parity test over them would prove nothing. Layer by layer, on a calibration prompt,
each router is nudged until every expert's load is near the mean:
- DeepSeek-V3 has a per-expert score-correction bias made for exactly this (its
  auxiliary-loss-free balancing): raise it for underloaded experts, lower it for overloaded ones;
- softmax routers have no bias, so the same nudge moves each expert's gate row along the mean
  router input, which shifts that expert's logit for typical tokens.

Letters: T tokens, H hidden, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moegen.config import RouterConfig
from moegen.models.batch import AttnBatch
from moegen.models.kv_cache import allocate_kv
from moegen.models.moe import route
from moegen.models.reference import ReferenceModel
from moegen.models.weights import RouterWeights

MAX_ROUNDS = 400


@torch.inference_mode()
def balance_routers(model: ReferenceModel, prompt_ids: list[int]) -> int:
    """Balance every MoE router of `model` in place on one prefill of `prompt_ids`.
    Returns the smallest per-expert token count over all MoE layers afterwards."""
    loads: list[int] = []

    def hook(layer: int, x: Tensor) -> None:
        moe = model.w.layers[layer].moe
        loads.append(_balance(moe.router, model.cfg.moe.router, x))

    batch = AttnBatch.build(slots=[0], past_lens=[0], q_lens=[len(prompt_ids)])
    kv = allocate_kv(model.cfg, 1, len(prompt_ids), model.w.embed_tokens.dtype)
    model.forward(torch.tensor(prompt_ids), batch, kv, router_hook=hook)
    return min(loads, default=0)


def _balance(w: RouterWeights, cfg: RouterConfig, x: Tensor) -> int:
    """Nudge one router until each expert gets at least half its fair share of x's [T, H] tokens."""
    fair = x.shape[0] * cfg.top_k / cfg.num_experts
    floor = max(1, int(fair / 2))
    mean = x.float().mean(0)  # [H]
    along_mean = mean / mean.pow(2).sum()  # [H]: moving a gate row by d·this shifts its logit by ~d
    step = 0.02 if cfg.scoring == "sigmoid" else 0.1
    for round_ in range(MAX_ROUNDS):
        load = _load(w, cfg, x)
        if load.min() >= floor:
            break
        nudge = step * torch.sign(fair - load) * (0.995**round_)  # [E], + for underloaded experts
        if w.e_score_correction_bias is not None:
            w.e_score_correction_bias += nudge
        else:
            w.gate += nudge[:, None] * along_mean[None, :]
    return int(_load(w, cfg, x).min())


def _load(w: RouterWeights, cfg: RouterConfig, x: Tensor) -> Tensor:
    """[E] tokens routed to each expert."""
    experts = route(w, cfg, x).experts.flatten()
    return torch.bincount(experts, minlength=cfg.num_experts).float()
