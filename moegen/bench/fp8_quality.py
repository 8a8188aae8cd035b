"""What quantizing at load costs in outputs (`moegen bench --scenario fp8-quality`): greedy completions of the
bench prompts with the weights as loaded and with `--weight-dtype fp8` / `fp8-all`, on the reference engine
(whose dequantized weights are the runtime's, bit for bit). Per choice: how many completions equal the
unquantized run's, and at the first position where one does not (the same prefix in both runs), how far the
logits moved: the mean |Δ logit| over the vocabulary, and the gap between the two runs' chosen tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHOICES = ("fp8", "fp8-all")


def compare(ref, gens) -> dict:
    """Identical completions of `gens` against `ref`, and the logits at each first divergence."""
    identical, moved, gaps = 0, [], []
    for r, g in zip(ref, gens):
        at = next((i for i, (a, b) in enumerate(zip(r.token_ids, g.token_ids)) if a != b), None)
        if at is None and len(r.token_ids) == len(g.token_ids):
            identical += 1
            continue
        at = min(len(r.token_ids), len(g.token_ids)) - 1 if at is None else at  # one stopped early: its EOS
        ours, theirs = g.logits[at].float(), r.logits[at].float()
        moved.append((ours - theirs).abs().mean().item())
        gaps.append((theirs[r.token_ids[at]] - theirs[g.token_ids[at]]).item())
    return {"identical": identical, "total": len(ref),
            "mean_abs_dlogit_at_divergence": sum(moved) / len(moved) if moved else 0.0,
            "mean_ref_gap_at_divergence": sum(gaps) / len(gaps) if gaps else 0.0,
            "max_abs_logit": max(x.abs().max().item() for r in ref for x in r.logits)}


def scenario(model_dir: Path, prompts: int, new_tokens: int, say=print) -> dict:
    from transformers import AutoTokenizer

    from moegen.bench.vs_transformers import bench_prompts
    from moegen.models.hf_config import generation_eos_ids
    from moegen.models.loader import load_checkpoint
    from moegen.models.reference import ReferenceModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [tokenizer(t)["input_ids"] for t in bench_prompts(tokenizer, prompts)]
    runs, out = {}, {"model": str(model_dir), "prompts": prompts, "new_tokens": new_tokens, "choices": {}}
    for choice in ("auto",) + CHOICES:
        cfg, weights, report = load_checkpoint(model_dir, torch.float32, choice)
        say(f"  --weight-dtype {choice}: {len(ids)} greedy completions of {new_tokens} tokens ...")
        with torch.inference_mode():
            runs[choice] = ReferenceModel(cfg, weights).generate(ids, new_tokens, generation_eos_ids(model_dir, cfg),
                                                                 keep_logits=True)
        if choice != "auto":
            out["choices"][choice] = compare(runs["auto"], runs[choice]) | {
                "tensors": report.quantized.tensors, "bytes_before": report.quantized.bytes_before,
                "bytes_after": report.quantized.bytes_after}
    return out
