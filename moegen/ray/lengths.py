"""The job's request lengths, measured in Ray before the engines start: the longest sizes every engine's rows
(as one process fits --max-seq-len to its longest request), and their means are what each engine plans for."""

from __future__ import annotations

from pathlib import Path

from moegen.io.prompts import row_request
from moegen.ray.rows import rows_of

_TOKENIZERS: dict[Path, object] = {}  # per Ray worker process


def lengths(todo, model_dir: Path, opts) -> list[tuple[int, int]]:
    """(prompt tokens, max new tokens) of each row that becomes a request (the others become error records
    in the engines, which read them the same way)."""
    template = opts.chat_template.read_text() if opts.chat_template else None

    def measure(batch: dict) -> dict:
        from moegen.generate import load_tokenizer
        from moegen.models.hf_config import load_model_config

        if model_dir not in _TOKENIZERS:
            _TOKENIZERS[model_dir] = (load_tokenizer(model_dir), load_model_config(model_dir).max_position_embeddings)
        tokenizer, context = _TOKENIZERS[model_dir]
        prompt, new = [], []
        for row, index in rows_of(batch, opts.fields, str(opts.dataset)):
            built = row_request(row, index, tokenizer, opts.defaults, context, template, str(opts.dataset))
            if not isinstance(built, str):
                prompt.append(len(built.prompt_ids))
                new.append(built.max_new_tokens)
        return {"prompt": prompt, "new": new}

    measured = todo.map_batches(measure, batch_size=1024, batch_format="numpy").take_all()
    return [(int(r["prompt"]), int(r["new"])) for r in measured]
