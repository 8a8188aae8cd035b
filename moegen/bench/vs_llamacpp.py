"""moegen against llama.cpp on the cpu: same checkpoint (GGUF F32 for llama.cpp, float32 for moegen),
the same prompts (llama.cpp gets them as moegen's token ids), the same token counts, greedy, EOS
ignored. Every engine timed end to end from process start (loading included), the engines alternated
over rounds on one machine; the ratio is of the best run of each (these machines are shared: a busy
moment slows one run, not every one).

Prompts are distinct from their first tokens on, so no engine finds a shared prefix to skip (moegen's
prefix sharing would; llama.cpp's batched-bench has none).
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

from moegen.bench import llamacpp
from moegen.bench.vs_transformers import _calibrate, run_moegen


def distinct_prompts(tokenizer, count: int, length: int) -> list[str]:
    """`count` prompts of real text, each `length` tokens with its BOS and each starting with its own number."""
    from moegen.checkpoints.balance import CALIBRATION_TEXT

    ids = tokenizer(CALIBRATION_TEXT * 4, add_special_tokens=False)["input_ids"]
    bos = len(tokenizer("x")["input_ids"]) - len(tokenizer("x", add_special_tokens=False)["input_ids"])
    out = []
    for i in range(count):
        start = (i * 29) % max(1, len(ids) - 2 * length)
        text = f"{i}. " + tokenizer.decode(ids[start: start + 2 * length])
        out.append(tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][: length - bos]))
    return out


def scenario(model_dir: Path, prompts: int, prompt_len: int, new_tokens: int, rounds: int, cache: Path, say,
             dtype: str = "float32") -> dict:
    """Build llama.cpp and convert `model_dir` (once each, to GGUF in `dtype`), then `rounds` rounds of moegen
    serve-offline --dtype `dtype`, llama-batched-bench and llama-server; raises llamacpp.Unavailable before any
    run where it can't be built."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = distinct_prompts(tokenizer, prompts, prompt_len)
    prompt_ids = [tokenizer(t)["input_ids"] for t in texts]
    lengths = list(map(len, prompt_ids))
    llama = llamacpp.build(cache, say)
    model = llamacpp.gguf(llama, model_dir, cache, say, llamacpp.GGUF_TYPES[dtype])
    overrides = llamacpp.load_overrides(model_dir)
    threads = os.cpu_count() or 1
    _calibrate(model_dir, say, "cpu", dtype)  # the dtype timed: a bf16 run would otherwise calibrate in round 1
    runs = []
    for r in range(rounds):
        say(f"  round {r + 1} of {rounds}: moegen serve-offline ...")
        with tempfile.TemporaryDirectory(prefix="moegen-bench-") as tmp:
            seconds, outputs, stats = run_moegen(model_dir, texts, new_tokens, Path(tmp),
                                                 ("--device", "cpu", "--dtype", dtype))
        generated = sum(map(len, outputs))
        runs.append({"engine": "moegen serve-offline", "round": r, "seconds": seconds, "generated": generated,
                     "tok_s": generated / seconds, "steps": stats.get("steps")})
        say(f"  round {r + 1}: llama-batched-bench ...")
        runs.append({**llamacpp.batched_bench(llama, model, overrides, prompts, round(statistics.mean(lengths)),
                                              new_tokens, threads), "round": r})
        say(f"  round {r + 1}: llama-server ...")
        runs.append({**llamacpp.server(llama, model, overrides, prompt_ids, new_tokens, threads,
                                       model.with_suffix(".server.log")), "round": r})
        say("  " + ", ".join(f"{x['engine']} {x['tok_s']:.0f} tok/s" for x in runs[-3:]))
    ours = [x["tok_s"] for x in runs if x["engine"].startswith("moegen")]
    theirs = [x for x in runs if x["engine"].startswith("llama.cpp")]
    best = max(theirs, key=lambda x: x["tok_s"])
    return {"model": str(model_dir), "gguf": str(model), "dtype": dtype, "prompts": prompts, "prompt_tokens": [min(lengths),
            max(lengths), sum(lengths)], "new_tokens": new_tokens, "threads": threads, "rounds": rounds,
            "llama_cpp": llamacpp.SDIST, "overrides": overrides, "runs": runs, "best_llama_cpp": best["engine"],
            "ratio_best": max(ours) / best["tok_s"],
            "ratio_median": statistics.median(ours) / statistics.median(x["tok_s"] for x in theirs
                                                                        if x["engine"] == best["engine"])}
