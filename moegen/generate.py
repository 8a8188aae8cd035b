"""`moegen generate`: greedy completions of a few prompts, with the engine the user picks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moegen.models.hf_config import generation_eos_ids
from moegen.models.loader import load_checkpoint
from moegen.models.reference import ReferenceModel

ENGINES = ("reference",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
    load_s: float  # reading the checkpoint and tokenizer
    generate_s: float  # prefill + decode


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer  # tokenizers are what moegen takes from transformers

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{model_dir}: no usable tokenizer (tokenizer.json / tokenizer_config.json): {exc}") from exc


def generate(model_dir: Path, prompts: list[str], max_new_tokens: int, engine: str = "reference",
             dtype: str = "float32") -> tuple[list[Completion], GenerateStats]:
    """Greedy completions of `prompts` (tokenized as `tokenizer(text)` does), run together."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not available; choose one of {', '.join(ENGINES)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    start = time.perf_counter()
    cfg, weights, _ = load_checkpoint(model_dir, DTYPES[dtype])  # first: its errors say more than the tokenizer's
    tokenizer = load_tokenizer(model_dir)
    ids = [tokenizer(text)["input_ids"] for text in prompts]
    for i, (text, p) in enumerate(zip(prompts, ids)):
        if not p:
            raise ValueError(f"prompt {i} ({text!r}) tokenizes to nothing; give it some text")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with {max_new_tokens} new ones it exceeds the model's "
                             f"{cfg.max_position_embeddings}-token context; shorten it or lower --max-new-tokens")
    loaded = time.perf_counter()
    gens = ReferenceModel(cfg, weights).generate(ids, max_new_tokens, generation_eos_ids(model_dir, cfg))
    done = time.perf_counter()
    completions = [
        Completion(i, text, tokenizer.decode(g.token_ids, skip_special_tokens=True), g.token_ids, g.finish_reason, len(p))
        for i, (text, p, g) in enumerate(zip(prompts, ids, gens))
    ]
    stats = GenerateStats(sum(map(len, ids)), sum(len(g.token_ids) for g in gens), loaded - start, done - loaded)
    return completions, stats
