"""`moegen generate`: completions of a few prompts, with the engine the user picks."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path


from moegen.models.hf_config import generation_eos_ids, load_model_config
from moegen.models.loader import load_checkpoint
from moegen.models.reference import ReferenceModel
from moegen.runtime.auto import resolve_dtype
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.requests import Request

ENGINES = ("runtime", "reference")


@dataclass(slots=True)
class SamplingOptions:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0  # prompt i gets seed + i
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(slots=True)
class Completion:
    index: int  # position of the prompt in the request
    prompt: str
    text: str  # decoded generated tokens, special tokens dropped
    token_ids: list[int]  # generated ids only
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int


@dataclass(slots=True)
class GenerateStats:
    prompt_tokens: int
    generated_tokens: int
    load_s: float  # reading the checkpoint and tokenizer, placing weights
    generate_s: float  # prefill + decode


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer  # tokenizers are what moegen takes from transformers

    if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):  # else transformers builds an empty one
        raise ValueError(f"{model_dir}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the "
                         "checkpoint's tokenizer files into it")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{model_dir}: no usable tokenizer (tokenizer.json / tokenizer_config.json): {exc}; copy "
                         "the checkpoint's tokenizer files into it") from exc


def generate(model_dir: Path, prompts: list[str], options: SamplingOptions, engine: str = "runtime",
             rcfg: RuntimeConfig | None = None, fit_seq_len: bool = True, trace: Path | None = None,
             trace_steps: range | None = None, plan_user: frozenset[str] | None = None,
             say=lambda _: None) -> tuple[list[Completion], GenerateStats]:
    """Completions of `prompts` (tokenized as `tokenizer(text)` does), run together. With `fit_seq_len`
    the runtime's KV rows are sized to the longest prompt + max_new_tokens instead of rcfg.max_seq_len.
    With `plan_user` (the knobs the user set) the runtime engine plans every other knob (told to `say`)."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not available; choose one of {', '.join(ENGINES)}")
    if options.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {options.max_new_tokens}")
    start = time.perf_counter()
    cfg = load_model_config(model_dir)  # first: its errors say more than the tokenizer's
    tokenizer = load_tokenizer(model_dir)
    ids = [tokenizer(text)["input_ids"] for text in prompts]
    for i, (text, p) in enumerate(zip(prompts, ids)):
        if not p:
            raise ValueError(f"prompt {i} ({text!r}) tokenizes to nothing; give it some text")
        if len(p) + options.max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with {options.max_new_tokens} new ones it exceeds the "
                             f"model's {cfg.max_position_embeddings}-token context; shorten it or lower --max-new-tokens")
    eos = () if options.ignore_eos else generation_eos_ids(model_dir, cfg)
    if engine == "reference":
        results, loaded, done = _reference(model_dir, ids, options, eos, rcfg)
    else:
        results, loaded, done = _runtime(model_dir, ids, options, rcfg, fit_seq_len, trace, trace_steps, plan_user,
                                         say)
    completions = [
        Completion(i, text, tokenizer.decode(tokens, skip_special_tokens=True), tokens, reason, len(p))
        for i, (text, p, (tokens, reason)) in enumerate(zip(prompts, ids, results))
    ]
    stats = GenerateStats(sum(map(len, ids)), sum(len(c.token_ids) for c in completions), loaded - start, done - loaded)
    return completions, stats


def _reference(model_dir, ids, options: SamplingOptions, eos, rcfg):
    if options.temperature > 0:
        raise ValueError("the reference engine is greedy only; drop --temperature or use --engine runtime")
    dtype = resolve_dtype(rcfg or RuntimeConfig(), model_dir).torch_dtype
    cfg, weights, _ = load_checkpoint(model_dir, dtype)
    model = ReferenceModel(cfg, weights)
    loaded = time.perf_counter()
    gens = model.generate(ids, options.max_new_tokens, tuple(eos) + tuple(options.stop_token_ids))
    return [(g.token_ids, g.finish_reason) for g in gens], loaded, time.perf_counter()


def _runtime(model_dir, ids, options: SamplingOptions, rcfg: RuntimeConfig | None, fit_seq_len: bool,
             trace: Path | None = None, trace_steps: range | None = None, plan_user: frozenset[str] | None = None,
             say=lambda _: None):
    from moegen.planner.plan import open_engine

    rcfg = rcfg or RuntimeConfig()
    if fit_seq_len:
        rcfg = dataclasses.replace(rcfg, max_seq_len=max(map(len, ids)) + options.max_new_tokens)
    requests = [Request(p, options.max_new_tokens, temperature=options.temperature, top_k=options.top_k,
                        top_p=options.top_p, seed=options.seed + i, stop_token_ids=tuple(options.stop_token_ids),
                        ignore_eos=options.ignore_eos, id=i)
                for i, p in enumerate(ids)]
    engine, _ = open_engine(model_dir, rcfg, requests, plan_user, say, trace, trace_steps)
    loaded = time.perf_counter()
    try:
        by_id = {r.id: (r.token_ids, r.finish_reason) for r in engine.generate(requests)}
    finally:
        engine.close()
    return [by_id[i] for i in range(len(ids))], loaded, time.perf_counter()



