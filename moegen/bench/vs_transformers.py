"""moegen against transformers `generate` on one device (the cpu or a GPU): same checkpoint,
prompts and token counts.

transformers runs with its library defaults under `inference_mode`, left padding, in batches,
float32 (the one setting changed: its default would load the bfloat16 checkpoint as bfloat16,
and the parity rule is defined in float32), timed around `generate` only. moegen runs as a user
runs it: `python -m moegen serve-offline` with no knobs but the device and float32, timed from
process start to exit (imports, loading, tokenizing, writing results included). Tokens are
checked by the parity rule against the first transformers batch size.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moegen.bench.flops import model_work
from moegen.io import json_bytes
from moegen.parity import compare_greedy


@dataclass(slots=True)
class EngineRun:
    engine: str  # what ran, as the table shows it
    seconds: float  # wall time measured as the docstring says
    generated: int  # tokens generated
    tok_s: float  # generated tokens / seconds
    flop_s: float  # the job's useful FLOPs (no padding) / seconds
    peak_memory_gib: float = 0.0  # moegen: the process's peak RSS


def bench_prompts(tokenizer, count: int, shortest: int = 32, longest: int = 128) -> list[str]:
    """`count` distinct prompts of real text, `shortest`..`longest` tokens each (the calibration
    paragraph, cut at varied offsets), as text: each engine tokenizes them itself."""
    from moegen.checkpoints.balance import CALIBRATION_TEXT

    ids = tokenizer(CALIBRATION_TEXT * 8, add_special_tokens=False)["input_ids"]
    out = []
    for i in range(count):
        length = shortest + (i * 37) % (longest - shortest)  # leaves room for the BOS the tokenizer adds
        start = (i * 53) % (len(ids) - length)
        out.append(tokenizer.decode(ids[start: start + length]))
    return out


def run_transformers(model_dir: Path, prompt_ids: list[list[int]], new_tokens: int, batch: int,
                     pad_id: int, device: str = "cpu") -> tuple[float, list[list[int]]]:
    """(seconds of generate, completions) for transformers in batches of `batch`, left padded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(device)
    outputs = []
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(prompt_ids), batch):
            group = prompt_ids[first: first + batch]
            width = max(map(len, group))
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
            outputs += out[:, width:].tolist()
    return time.perf_counter() - start, outputs


def run_moegen(model_dir: Path, prompts: list[str], new_tokens: int, workdir: Path,
               extra: tuple[str, ...] = ()) -> tuple[float, list[list[int]], dict]:
    """(seconds from process start to exit, completions, the run's stats JSON) of serve-offline."""
    dataset, output, stats = workdir / "prompts.jsonl", workdir / "results.jsonl", workdir / "stats.json"
    dataset.write_bytes(b"".join(json_bytes.dumps({"prompt": p}) + b"\n" for p in prompts))
    command = [sys.executable, "-m", "moegen", "serve-offline", str(model_dir), "--dataset", str(dataset),
               "--output", str(output), "--overwrite", "--max-new-tokens", str(new_tokens), "--ignore-eos",
               "--output-token-ids", "--stats-json", str(stats), *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    records = {r["id"]: r for r in map(json_bytes.loads, output.read_bytes().splitlines())}
    return seconds, [records[i]["token_ids"] for i in range(len(prompts))], json_bytes.loads(stats.read_bytes())


def check_parity(model_dir: Path, prompt_ids: list[list[int]], ours: list[list[int]],
                 oracle: list[list[int]]) -> dict:
    """The parity rule per completion; at a divergence, the oracle's logits come from transformers
    run on that prompt alone (no padding) up to the divergence."""
    from transformers import AutoModelForCausalLM

    model = None
    identical, near_ties, failures = 0, 0, []
    for i, (a, b) in enumerate(zip(ours, oracle)):
        if a == b:
            identical += 1
            continue
        at = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.inference_mode():
            logits = model(torch.tensor([prompt_ids[i] + b[:at]])).logits[0, -1]
        result = compare_greedy(a, b, oracle_logits=[None] * at + [logits])
        if result.ok:
            near_ties += 1
        else:
            failures.append(f"prompt {i}: {result.detail}")
    return {"identical": identical, "near_ties": near_ties, "failures": failures, "total": len(ours)}


def scenario(model_dir: Path, prompts: int, new_tokens: int, hf_batches: tuple[int, ...], peak: float,
             say=print, device: str = "cpu") -> dict:
    """Both engines on one checkpoint; returns every number (runs, parity, ratios) for the JSON."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = bench_prompts(tokenizer, prompts)
    prompt_ids = [tokenizer(t)["input_ids"] for t in texts]
    work = model_work(model_dir)
    flops = work.job_flops(list(map(len, prompt_ids)), new_tokens)
    generated = prompts * new_tokens
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    _calibrate(model_dir, say, device)
    with tempfile.TemporaryDirectory(prefix="moegen-bench-") as tmp:
        say(f"  moegen serve-offline on {prompts} prompts ...")
        seconds, ours, stats = run_moegen(model_dir, texts, new_tokens, Path(tmp),
                                          ("--device", device, "--dtype", "float32"))
    runs = [EngineRun("moegen serve-offline (no knobs)", seconds, generated, generated / seconds, flops / seconds,
                      stats["peak_host_memory_gib"])]
    oracle = None
    for batch in hf_batches:
        say(f"  transformers generate, batch {batch} ...")
        seconds, outputs = run_transformers(model_dir, prompt_ids, new_tokens, batch, pad_id, device)
        oracle = oracle or outputs
        runs.append(EngineRun(f"transformers generate, batch {batch}", seconds, generated, generated / seconds,
                              flops / seconds))
    say("  parity ...")
    parity = check_parity(model_dir, prompt_ids, ours, oracle)
    best = max(runs[1:], key=lambda r: r.tok_s)
    lengths = list(map(len, prompt_ids))
    return {
        "model": str(model_dir), "prompts": prompts, "prompt_tokens": [min(lengths), max(lengths), sum(lengths)],
        "new_tokens": new_tokens, "job_flops": flops, "matmul_peak_flop_s": peak,
        "runs": [asdict(r) for r in runs], "moegen_stats": stats, "parity": parity,
        "ratio_to_best_transformers": runs[0].tok_s / best.tok_s, "best_transformers": best.engine,
    }


def _calibrate(model_dir: Path, say, device: str, dtype: str = "float32") -> None:
    """The planner's calibration of this machine, model and dtype, made (and cached) before the timed run: a
    one-time cost per machine, as a user pays it once, not per job."""
    from moegen.models.loader import load_checkpoint
    from moegen.planner.plan import calibration_for
    from moegen.runtime.config import RuntimeConfig

    cfg, weights, _ = load_checkpoint(model_dir)
    calibration_for(cfg, weights, RuntimeConfig(device=device, dtype=dtype), lambda line: say("  " + line))
