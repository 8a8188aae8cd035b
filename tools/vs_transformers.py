"""First side-by-side number: moegen's runtime vs transformers `generate`, same prompts, one run.

    python tools/vs_transformers.py MODEL_DIR [--prompts 64] [--new-tokens 32] [--hf-batch 32]

Prompts are 32-128 tokens of real text (the calibration paragraph, cut at varied offsets), greedy,
EOS ignored so every request generates exactly --new-tokens. transformers runs with library
defaults under `inference_mode`, left padding, in batches of --hf-batch; moegen with its default
knobs on the cpu backend. Prints generated tokens/s of both, the ratio, and how many completions
are token-identical (batched padding in transformers may shift float rounding). Not tuned: the
performance issue owns speed; this records where the runtime starts.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def prompts_for(tokenizer, count: int) -> list[list[int]]:
    from moegen.checkpoints.balance import CALIBRATION_TEXT

    ids = tokenizer(CALIBRATION_TEXT * 4, add_special_tokens=False)["input_ids"]
    out = []
    for i in range(count):
        length = 32 + (i * 37) % 97  # 32..128
        start = (i * 53) % (len(ids) - length)
        out.append([tokenizer.bos_token_id] + ids[start: start + length - 1])
    return out


def run_transformers(model_dir, prompts, new_tokens, batch) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = 0
    outputs = []
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(prompts), batch):
            group = prompts[first: first + batch]
            width = max(map(len, group))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
            outputs += out[:, width:].tolist()
    return time.perf_counter() - start, outputs


def run_moegen(model_dir, prompts, new_tokens) -> tuple[float, float, list[list[int]]]:
    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request

    start = time.perf_counter()
    engine = Engine.from_model_dir(model_dir, RuntimeConfig(max_seq_len=max(map(len, prompts)) + new_tokens))
    loaded = time.perf_counter()
    with engine:
        results = {r.id: r.token_ids for r in engine.generate(
            [Request(p, new_tokens, ignore_eos=True) for p in prompts])}
    return loaded - start, time.perf_counter() - loaded, [results[i] for i in range(len(prompts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hf-batch", type=int, default=32)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = prompts_for(tokenizer, args.prompts)
    hf_s, hf_out = run_transformers(args.model_dir, prompts, args.new_tokens, args.hf_batch)
    load_s, mg_s, mg_out = run_moegen(args.model_dir, prompts, args.new_tokens)
    generated = args.prompts * args.new_tokens
    same = sum(a == b for a, b in zip(hf_out, mg_out))
    numbers = {
        "model": args.model_dir, "prompts": args.prompts, "new_tokens": args.new_tokens,
        "prompt_tokens": sum(map(len, prompts)), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers_s": hf_s, "transformers_tok_s": generated / hf_s, "hf_batch": args.hf_batch,
        "moegen_s": mg_s, "moegen_load_s": load_s, "moegen_tok_s": generated / mg_s,
        "ratio": hf_s / mg_s, "identical_completions": same,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f, indent=2)
    print(f"{'engine':<32}{'seconds':>10}{'generated tok/s':>18}")
    print(f"{'transformers generate, batch ' + str(args.hf_batch):<32}{hf_s:>10.2f}{generated / hf_s:>18.1f}")
    print(f"{'moegen runtime (defaults, cpu)':<32}{mg_s:>10.2f}{generated / mg_s:>18.1f}")
    print(f"moegen / transformers: {hf_s / mg_s:.2f}x; identical completions {same}/{args.prompts}; "
          f"moegen load {load_s:.1f}s (not in its time)")


if __name__ == "__main__":
    main()
