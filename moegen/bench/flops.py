"""The work a generation job is: matmul parameters touched per token and attention FLOPs, read from
the checkpoint's tensor shapes (safetensors headers; nothing is loaded).

A token touches every non-expert weight of every layer, top_k of the num_experts routed experts,
and (once per generated token) the lm_head; the embedding is a lookup, not a matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from moegen.config import MLAConfig, ModelConfig
from moegen.models.hf_config import load_model_config


@dataclass(frozen=True, slots=True)
class ModelWork:
    layer_params: int  # matmul weights one token touches in all layers (routed experts weighted by top_k / E)
    head_params: int  # lm_head
    score_flops_per_ctx: int  # attention QK^T + PV FLOPs per token per visible key, all layers
    weight_bytes: int  # every weight at float32 (what the cpu backend holds)
    expert_params: int  # one routed expert (the unit a link streams)

    def job_flops(self, prompt_lens: list[int], new_tokens: int) -> float:
        """FLOPs of generating `new_tokens` after each prompt: every prompt token and every generated
        token but the last runs through the layers; each generated token needs one lm_head row."""
        total = 0.0
        for p in prompt_lens:
            n = p + new_tokens - 1  # tokens run through the layers
            total += 2 * self.layer_params * n + self.score_flops_per_ctx * n * (n + 1) / 2
            total += 2 * self.head_params * new_tokens
        return total


def model_work(model_dir: Path) -> ModelWork:
    cfg = load_model_config(model_dir)
    shapes = _shapes(Path(model_dir))
    E, K = cfg.moe.router.num_experts, cfg.moe.router.top_k
    layer = head = total = 0
    routed: dict[int, int] = {}  # MoE layer -> params of all its routed experts
    for name, shape in shapes.items():
        numel = math.prod(shape)
        total += numel
        if not name.startswith("model.layers.") or int(name.split(".")[2]) >= cfg.num_layers:
            head += numel if name.startswith("lm_head.") else 0  # the embedding is a lookup; MTP layers unused
        elif ".experts." in name:  # per-expert (experts.E.x_proj) and fused (experts.gate_up_proj) names
            index = int(name.split(".")[2])
            routed[index] = routed.get(index, 0) + numel
        elif len(shape) >= 2:  # norms and biases are not matmuls
            layer += numel
    layer += sum(routed.values()) * K // E
    if head == 0:  # tied: the embedding is the head
        head = cfg.vocab_size * cfg.hidden_size
    return ModelWork(layer, head, _score_flops(cfg), 4 * total, max(routed.values(), default=0) // E)


def _score_flops(cfg: ModelConfig) -> int:
    a = cfg.attention
    if isinstance(a, MLAConfig):  # expanded form: per head, keys of P+R dims and values of V dims
        per_head = a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim
    else:
        per_head = 2 * a.head_dim
    return 2 * a.num_heads * per_head * cfg.num_layers


def _shapes(model_dir: Path) -> dict[str, list[int]]:
    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                shapes[name] = f.get_slice(name).get_shape()
    return shapes
