"""Greedy parity with transformers, every family, both expert layouts.

moegen's reference model runs prompts of different lengths together; the oracle is
transformers `generate(do_sample=False)` on each prompt alone, float32, run here in the test.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moegen.models.hf_config import generation_eos_ids
from moegen.models.loader import load_checkpoint
from moegen.models.reference import ReferenceModel
from moegen.parity import compare_greedy

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "minimax_m2"]
NEW_TOKENS = 32
PROMPTS = [
    "Hi!",
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Once upon a time, in a village between two rivers, there lived an old clockmaker who repaired every clock "
    "in the valley. Each morning he walked to the market, listened to the bells of the church, and wrote down "
    "how many seconds each one was late. Children followed him and asked why time mattered so much to him. "
    "He answered that a village which agrees on the hour can meet, trade and sing together, and then he smiled.",
    "Release notes, version 2.4.1 (2026-03-14):\n- Fixed a crash when the input file was empty.\n- The --verbose flag "
    "now prints timings for every stage, in milliseconds.\n- Added support for CSV files with quoted fields, "
    "semicolons and UTF-8 byte-order marks.\n- Memory use fell by 35% on large inputs (over 10 GB).\n- Known issue: "
    "on Windows, paths longer than 260 characters still fail; use the \\\\?\\ prefix as a workaround.\n"
    "Thanks to Ana, Björn, Chen, Dmitri and Émilie for their reports! Questions? Write to dev@example.org.",
]


def oracle_generate(hf, prompt_ids: list[int]):
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                      return_dict_in_generate=True)
    return out.sequences[0, len(prompt_ids):].tolist(), [step[0] for step in out.logits]


def expert_loads(hf, sequences: list[list[int]]) -> dict[int, torch.Tensor]:
    """Tokens each expert of each MoE layer received over `sequences`, counted by transformers' own routers."""
    loads: dict[int, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(hf.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None or not hasattr(gate, "top_k"):
            continue  # dense layer
        loads[index] = torch.zeros(gate.num_experts, dtype=torch.int64)

        def count(module, args, output, index=index):
            loads[index] += torch.bincount(output[2].flatten(), minlength=module.num_experts)

        hooks.append(gate.register_forward_hook(count))
    with torch.no_grad():
        for seq in sequences:
            hf(torch.tensor([seq]))
    for hook in hooks:
        hook.remove()
    return loads


def check_family(path, oracle_path=None) -> list[str]:
    """moegen on the checkpoint at `path` against transformers on `oracle_path` (default: the same one)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(oracle_path or path, dtype=torch.float32).eval()
    cfg, weights, _ = load_checkpoint(path, torch.float32)
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    ours = ReferenceModel(cfg, weights).generate(prompts, NEW_TOKENS, generation_eos_ids(path, cfg), keep_logits=True)

    report, failures = [], []
    for i, (prompt, gen) in enumerate(zip(prompts, ours)):
        ref_ids, ref_logits = oracle_generate(hf, prompt)
        result = compare_greedy(gen.token_ids, ref_ids, gen.logits, ref_logits)
        report.append(f"prompt {i} ({len(prompt)} tokens): {result.detail}")
        if result.divergence is not None and result.ok:
            warnings.warn(f"{path.name} prompt {i}: {result.detail}")
        if not result.ok:
            failures.append(report[-1])
        if len(set(gen.token_ids)) < 8:
            failures.append(f"prompt {i}: degenerate completion {gen.token_ids}")
    loads = expert_loads(hf, [p + g.token_ids for p, g in zip(prompts, ours)])
    assert loads, "no MoE layer found"
    for layer, load in loads.items():
        idle = (load == 0).nonzero().flatten().tolist()
        if idle:
            failures.append(f"layer {layer}: experts {idle} received no tokens")
    assert not failures, "\n".join(failures + ["--- report:"] + report)
    return report


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_parity(family, layout, tiny_checkpoint):
    check_family(tiny_checkpoint(family, layout))


VARIANTS = {
    # DeepSeek-V2 proper: q-LoRA and group-limited greedy routing.
    "deepseek_v2-qlora-grouped": ("deepseek_v2", {"q_lora_rank": 24, "topk_method": "group_limited_greedy",
                                                  "n_group": 8, "topk_group": 3, "routed_scaling_factor": 16.0}),
    # DeepSeek-V3 with rotate-half rope instead of interleaved pairs.
    "deepseek_v3-no-interleave": ("deepseek_v3", {"rope_interleave": False}),
    # A sliding window shorter than the prompts.
    "mixtral-sliding": ("mixtral", {"sliding_window": 8}),
    "qwen2_moe-sliding": ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
    "olmoe-clip": ("olmoe", {"clip_qkv": 0.5}),
    # GLM-4-MoE with its per-head q/k norms on (GLM-4.5's config has them off).
    "glm4_moe-qk-norm": ("glm4_moe", {"use_qk_norm": True}),
    # A quarter of each head rotated, the factor given inside rope_parameters as transformers reads it.
    "glm4_moe-rotary-quarter": ("glm4_moe", {"partial_rotary_factor": None, "rope_theta": None,
                                             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                 "partial_rotary_factor": 0.25}}),
    # Group-limited selection: 160 experts in 8 groups, the best 3 groups per token.
    "glm4_moe-grouped": ("glm4_moe", {"n_group": 8, "topk_group": 3}),
    # MiniMax-M2 rotating 12 of its 16 head dims instead of half.
    "minimax_m2-rotary-dim": ("minimax_m2", {"rotary_dim": 12}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_parity_variants(variant, tiny_checkpoint):
    family, overrides = VARIANTS[variant]
    check_family(tiny_checkpoint(family, **overrides))
