"""The reference forward: the model units called in order, layer by layer, on one device.

Prefill all prompts together, then decode one token per running sequence per step, with a KV
cache. No offload, no overlap: it is the debugging oracle the runtime is checked against, and
`moegen generate --engine reference`.

Letters: T tokens of a step (all sequences), B sequences, H hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from moegen.config import MLAConfig, ModelConfig
from moegen.formats.weight_dtype import plain_model
from moegen.models.attention import gqa_attention
from moegen.models.batch import AttnBatch
from moegen.models.kv_cache import LayerKV, allocate_kv
from moegen.models.linear import linear
from moegen.models.mla import mla_attention
from moegen.models.moe import mlp, moe_block
from moegen.models.rope import Rope, rms_norm
from moegen.models.weights import LayerWeights, ModelWeights


RouterHook = Callable[[int, Tensor], None]  # (layer index, router input [T, H])


@dataclass(slots=True)
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated ids only
    finish_reason: str = "length"  # "stop" (an EOS id) or "length" (max_new_tokens)
    logits: list[Tensor] = field(default_factory=list)  # [V] per generated token, when asked for


def embed(w: ModelWeights, token_ids: Tensor) -> Tensor:
    """[T] ids -> [T, H]."""
    return F.embedding(token_ids, w.embed_tokens)


def lm_head(w: ModelWeights, cfg: ModelConfig, h: Tensor) -> Tensor:
    """Final norm + projection: [t, H] -> [t, V] logits in float32."""
    return linear(rms_norm(h, w.norm, cfg.rms_norm_eps), w.lm_head).float()


class ReferenceModel:
    """A whole model on one device, built from the units."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights):
        self.cfg, self.w = cfg, plain_model(weights)  # an FP8 checkpoint's linears, dequantized once
        self.rope = Rope(cfg.attention.rope, device=weights.embed_tokens.device)

    def layer(self, index: int, lw: LayerWeights, h: Tensor, batch: AttnBatch, kv: LayerKV,
              router_hook: RouterHook | None = None) -> Tensor:
        """One decoder layer: h [T, H] -> [T, H]. `router_hook(layer, x)` sees each MoE router's input."""
        cfg = self.cfg
        x = rms_norm(h, lw.input_layernorm, cfg.rms_norm_eps)
        if isinstance(cfg.attention, MLAConfig):
            attn = mla_attention(lw.attn, cfg.attention, self.rope, x, batch, kv)
        else:
            attn = gqa_attention(lw.attn, cfg.attention, self.rope, x, batch, kv, cfg.sliding_windows[index])
        h = h + attn
        x = rms_norm(h, lw.post_attention_layernorm, cfg.rms_norm_eps)
        if router_hook is not None and lw.moe is not None:
            router_hook(index, x)
        return h + (moe_block(lw.moe, cfg.moe, x) if lw.moe is not None else mlp(lw.mlp, x))

    def forward(self, token_ids: Tensor, batch: AttnBatch, kv: list[LayerKV], router_hook: RouterHook | None = None) -> Tensor:
        """token_ids [T] (sequence by sequence, as in `batch`) -> logits [B, V] of each sequence's last token."""
        h = embed(self.w, token_ids)
        for index, lw in enumerate(self.w.layers):
            h = self.layer(index, lw, h, batch, kv[index], router_hook)
        last = torch.cumsum(batch.q_lens, 0) - 1  # [B] flattened index of each sequence's last token
        return lm_head(self.w, self.cfg, h[last])

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: tuple[int, ...] | None = None,
                 keep_logits: bool = False) -> list[Generation]:
        """Greedy completions of all prompts, run together; each stops at an EOS id or max_new_tokens."""
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        eos = set(self.cfg.eos_token_ids if eos_ids is None else eos_ids)
        device = self.w.embed_tokens.device
        gens = [Generation(prompt_ids=list(p)) for p in prompts]
        kv = allocate_kv(self.cfg, len(prompts), max(map(len, prompts)) + max_new_tokens, self.w.embed_tokens.dtype, device)
        running = list(range(len(prompts)))
        step_tokens = [list(p) for p in prompts]
        while running and max_new_tokens > 0:
            batch = AttnBatch.build(
                slots=running,
                past_lens=[len(gens[i].prompt_ids) + len(gens[i].token_ids) - len(step_tokens[i]) for i in running],
                q_lens=[len(step_tokens[i]) for i in running],
                device=device,
            )
            ids = torch.tensor([t for i in running for t in step_tokens[i]], dtype=torch.int64, device=device)
            logits = self.forward(ids, batch, kv)  # [B, V]
            next_ids = logits.argmax(dim=-1).tolist()  # sync: the host decides who stops
            for row, i in enumerate(running):
                gens[i].token_ids.append(next_ids[row])
                if keep_logits:
                    gens[i].logits.append(logits[row].cpu())
                step_tokens[i] = [next_ids[row]]
                if next_ids[row] in eos:
                    gens[i].finish_reason = "stop"
            running = [i for i in running if gens[i].finish_reason != "stop" and len(gens[i].token_ids) < max_new_tokens]
        return gens
