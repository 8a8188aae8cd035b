"""Balance the routers of a random model so that every expert receives tokens.

Random router weights route unevenly: with 256 experts some would never run, and a parity test
over them would prove nothing. Layer by layer, on a calibration text, each router is nudged
until every expert gets at least half its fair share of the text's tokens, and at least one of
the text's first 100 tokens (so a 100-token prompt reaches every expert of every layer):
- sigmoid routers (DeepSeek-V3, GLM-4-MoE, MiniMax-M2) have a per-expert score-correction bias
  made for exactly this (auxiliary-loss-free balancing): raise it for underloaded experts, lower it
  for overloaded ones;
- softmax routers have no bias, so the same nudge moves each expert's gate row along the mean
  router input, which shifts that expert's logit for typical tokens.

Letters: T tokens, H hidden, E experts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from moegen.config import RouterConfig
from moegen.models.batch import AttnBatch
from moegen.models.kv_cache import allocate_kv
from moegen.models.moe import route
from moegen.models.reference import ReferenceModel
from moegen.models.weights import RouterWeights

MAX_ROUNDS = 300
HEAD_TOKENS = 100  # the prompt length on which every expert must get a token
CALIBRATION_TOKENS = 512
FAIR_SHARE_FLOOR = 0.5  # of its fair share of the calibration tokens, each expert gets at least this

CALIBRATION_TEXT = (
    "Mixture-of-experts models route every token to a few experts out of many. The router of each layer scores "
    "the experts, keeps the best ones, and mixes their outputs with the router's weights. On one graphics card "
    "whose memory is much smaller than the model, the weights live in host memory and travel over the PCIe link; "
    "batching many tokens per expert hides that transfer behind the computation. 12 apples, 3.5 litres, 1,024 "
    "tokens: numbers matter too!\n"
    "def mean(values):\n    total = sum(values)\n    return total / len(values) if values else 0.0\n\n"
    "\"Where are you going?\" asked the child. \"To the market,\" said the old woman, \"before the rain comes.\" "
    "They walked together past the mill, the bakery and the school, counting the swallows on the wires.\n"
    "Q: What is the boiling point of water at sea level? A: 100 degrees Celsius, or 212 degrees Fahrenheit.\n"
    "The committee met on Tuesday, March 4th, at 10:30; the minutes list seven decisions and two open questions. "
    "Résumé, naïve, café and 東京 are words too. Offline jobs, such as scoring a dataset, summarising documents "
    "or generating synthetic data, care about throughput rather than latency, so they can accumulate very large "
    "batches and keep every expert busy while the next one's weights are copied in."
)


def calibration_ids(tokenizer_json: Path, length: int = CALIBRATION_TOKENS) -> list[int]:
    """`length` ids of CALIBRATION_TEXT (BOS first, text repeated if short), via the `tokenizers` library."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(CALIBRATION_TEXT).ids
    return (ids * (length // len(ids) + 1))[:length]


@torch.inference_mode()
def balance_routers(model: ReferenceModel, prompt_ids: list[int]) -> int:
    """Balance every MoE router of `model` in place on one prefill of `prompt_ids`.
    Returns the fewest tokens of the first HEAD_TOKENS that any expert of any MoE layer gets."""
    head_loads: list[int] = []

    def hook(layer: int, x: Tensor) -> None:
        head_loads.append(_balance(model.w.layers[layer].moe.router, model.cfg.moe.router, x))

    batch = AttnBatch.build(slots=[0], past_lens=[0], q_lens=[len(prompt_ids)])
    kv = allocate_kv(model.cfg, 1, len(prompt_ids), model.w.embed_tokens.dtype)
    model.forward(torch.tensor(prompt_ids), batch, kv, router_hook=hook)
    return min(head_loads, default=0)


def _balance(w: RouterWeights, cfg: RouterConfig, x: Tensor) -> int:
    """Balance one router whose input is x [T, H]; returns the fewest head tokens any expert gets.

    First every expert is pushed towards its fair share of all T tokens until each has half of
    it; then experts idle on the first HEAD_TOKENS are raised alone (others untouched, so no
    covered expert is pushed out wholesale) until each has one of them."""
    fair = x.shape[0] * cfg.top_k / cfg.num_experts
    head = x[:HEAD_TOKENS]
    mean = x.float().mean(0)  # [H]
    along_mean = mean / mean.pow(2).sum()  # [H]: moving a gate row by d·this shifts its logit by ~d
    step = 0.02 if cfg.scoring == "sigmoid" else 0.1

    def nudge(delta: Tensor) -> None:  # delta [E]: logit (or bias) change per expert
        if w.e_score_correction_bias is not None:
            w.e_score_correction_bias += delta
        else:
            w.gate += delta[:, None] * along_mean[None, :]

    for round_ in range(MAX_ROUNDS):
        load = _load(w, cfg, x)
        if load.min() >= max(1.0, FAIR_SHARE_FLOOR * fair):
            break
        nudge(step * torch.sign(fair - load) * 0.99**round_)
    for _ in range(MAX_ROUNDS):
        idle = _load(w, cfg, head) == 0
        if not idle.any():
            break
        nudge(step / 4 * idle.float())
    return int(_load(w, cfg, head).min())


def _load(w: RouterWeights, cfg: RouterConfig, x: Tensor) -> Tensor:
    """[E] tokens routed to each expert."""
    experts = route(w, cfg, x).experts.flatten()
    return torch.bincount(experts, minlength=cfg.num_experts).float()
