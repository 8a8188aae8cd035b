"""Turn dataset rows into engine requests: chat template, tokenization, per-row sampling overrides.

A row that can't become a request (empty or too-long prompt, bad messages, an invalid sampling
value) yields an error message instead, naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moegen.io.dataset import Row
from moegen.runtime.requests import Request


@dataclass(frozen=True, slots=True)
class Defaults:
    """The CLI's sampling defaults, which a row's own fields override."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # greedy unless the row or --temperature says otherwise
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0  # row i (in file order) gets seed + i unless it has its own
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run every request to its max_new_tokens (benchmarks)


def row_request(row: Row, index: int, tokenizer, defaults: Defaults, context: int, chat_template: str | None,
                source: str) -> Request | str:
    """`build_request` for a row of the dataset `source`, or the error record's message: a row that failed to
    parse keeps its own (which names the file), any other reason is prefixed with `source`."""
    built = row.error or build_request(row, index, tokenizer, defaults, context, chat_template)
    if isinstance(built, str) and not built.startswith(source):
        return f"{source}, {built}"
    return built


def build_request(row: Row, index: int, tokenizer, defaults: Defaults, context: int,
                  chat_template: str | None) -> Request | str:
    """A Request for `row` (its engine id is `index`), or the reason it can't run."""
    try:
        params = _sampling(row, index, defaults)
    except (ValueError, TypeError) as exc:
        return f"{row.where}: {exc}"
    try:
        ids = _prompt_ids(row, tokenizer, chat_template)
    except Exception as exc:  # a template or tokenizer failure on one row must not end the job
        return (f"{row.where}: can't build the prompt ({type(exc).__name__}: {exc}); check the row's messages "
                "against the chat template (the tokenizer's, or --chat-template)")
    if not ids:
        return f"{row.where}: empty prompt (it tokenizes to nothing); give the row some text"
    if len(ids) + params["max_new_tokens"] > context:
        return (f"{row.where}: prompt of {len(ids)} tokens + {params['max_new_tokens']} new tokens exceeds the "
                f"model's {context}-token context; shorten the prompt or lower the row's max_tokens / --max-new-tokens")
    stop = params.pop("stop")
    try:
        return Request(ids, stop_strings=stop, id=index, ignore_eos=defaults.ignore_eos, **params)
    except ValueError as exc:
        return f"{row.where}: {exc}"


def _prompt_ids(row: Row, tokenizer, chat_template: str | None) -> list[int]:
    if row.messages is not None:
        if not isinstance(row.messages, list) or not all(isinstance(m, dict) and "content" in m for m in row.messages):
            raise ValueError("field 'messages' must be a list of {role, content} objects; write it as "
                             '[{"role": "user", "content": "..."}]')
        out = tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=True,
                                            chat_template=chat_template)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    if not row.prompt or not row.prompt.strip():
        return []
    return tokenizer(row.prompt)["input_ids"]


def _sampling(row: Row, index: int, d: Defaults) -> dict:
    p, names = row.params, row.param_names
    stop = p.get("stop", d.stop)
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"field 'stop' must be a string or a list of non-empty strings, got {stop!r}")

    def number(name: str, default, kind, low, high, low_open: bool = False):
        return _number(names.get(name, name), p.get(name, default), kind, low, high, low_open)

    return {
        "max_new_tokens": number("max_new_tokens", d.max_new_tokens, int, 1, None),
        "temperature": number("temperature", d.temperature, float, 0.0, None),
        "top_p": number("top_p", d.top_p, float, 0.0, 1.0, low_open=True),
        "top_k": number("top_k", d.top_k, int, 0, None),
        "seed": number("seed", d.seed + index, int, None, None),
        "stop": tuple(stop),
    }


def _number(name: str, value, kind, low, high, low_open: bool = False):
    """A finite number of `kind` within bounds; CSV cells arrive as text."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"field {name!r} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"field {name!r} must be a finite number, got {value!r}")
    if kind is int and value != int(value):
        raise ValueError(f"field {name!r} must be an integer, got {value!r}")
    value = kind(value)
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"field {name!r} must be {bounds}, got {value!r}")
    return value
