"""The results file: JSONL, one line per request, appended and flushed as each finishes.

Crash safety: a line is written whole with one `write` and flushed at once, so after a `kill -9`
the file holds complete lines plus at most one partial last line; `open_results` cuts that partial
line off before appending. Resuming skips every id already there (errors too, unless retried).
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moegen.io import json_bytes


class OutputError(ValueError):
    """The output file can't be used as asked; says which flag fixes it."""


def id_key(rid: Any) -> bytes:
    """Ids compare by their JSON spelling: 3 and "3" are different ids."""
    return json_bytes.dumps(rid)


@dataclass(slots=True)
class Existing:
    done: set[bytes] = field(default_factory=set)  # ids with a result line
    errors: set[bytes] = field(default_factory=set)  # ids with only an error line
    dropped_bytes: int = 0  # a partial last line cut off


def scan(path: Path, fmt: str) -> Existing:
    """The ids already in `path`; cuts off a partial last line (the trace of a crash)."""
    existing = Existing()
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
    for line in data[:good].split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json_bytes.loads(line)
        except json_bytes.JSONDecodeError as exc:
            raise OutputError(f"{path}: a complete line is not JSON ({exc}); is this a moegen results file?") from exc
        rid = record.get("custom_id") if fmt == "openai" else record.get("id")
        failed = record.get("error") is not None
        (existing.errors if failed else existing.done).add(id_key(rid))
    existing.errors -= existing.done
    if good < len(data):
        existing.dropped_bytes = len(data) - good
        with open(path, "r+b") as f:
            f.truncate(good)
    return existing


def drop_error_records(path: Path, fmt: str) -> None:
    """--retry-errors: rewrite the file without its error lines (atomically: a new file renamed over it)."""
    data = path.read_bytes()
    keep = []
    for line in data[: data.rfind(b"\n") + 1].splitlines(keepends=True):  # a partial last line is dropped too
        if line.strip() and json_bytes.loads(line).get("error") is None:
            keep.append(line)
    scratch = path.with_name(path.name + ".moegen-tmp")
    scratch.write_bytes(b"".join(keep))
    os.replace(scratch, path)


class ResultWriter:
    """Appends one JSON line per request; `fmt` "moegen" or "openai" (the OpenAI batch output shape)."""

    def __init__(self, path: Path, fmt: str, model: str):
        self.path, self.fmt, self.model = path, fmt, model
        self._file = open(path, "ab", buffering=0)  # unbuffered: one write() per line reaches the file at once

    def close(self) -> None:
        self._file.close()

    def result(self, rid: Any, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
               token_ids: list[int] | None = None, chat: bool = True) -> None:
        """One finished request; `token_ids` (the completion's ids) are written too when given; `chat`: it came
        as messages (a chat completion), else as a prompt (a text completion; only the openai shape differs)."""
        self.line(json_bytes.dumps(result_record(self.fmt, self.model, rid, text, finish_reason, prompt_tokens,
                                                 completion_tokens, token_ids, chat)))

    def error(self, rid: Any, message: str) -> None:
        self.line(json_bytes.dumps(error_record(self.fmt, rid, message)))

    def line(self, record: bytes) -> None:
        """One record already in JSON (an engine elsewhere made it: `moegen.ray`)."""
        self._file.write(record + b"\n")


def result_record(fmt: str, model: str, rid: Any, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int, token_ids: list[int] | None = None, chat: bool = True) -> dict:
    """The line of one finished request, `fmt` "moegen" or "openai"."""
    if fmt == "openai":
        record = _openai_result(rid, text, finish_reason, prompt_tokens, completion_tokens, model, chat)
    else:
        record = {"id": rid, "text": text, "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
                  "completion_tokens": completion_tokens}
    if token_ids is not None:
        record["token_ids"] = token_ids
    return record


def error_record(fmt: str, rid: Any, message: str) -> dict:
    """The line of a request that could not run."""
    if fmt == "openai":
        return {"id": f"batch_req_{_suffix(rid)}", "custom_id": rid, "response": None,
                "error": {"code": "invalid_request", "message": message}}
    return {"id": rid, "error": message}


def _suffix(rid: Any) -> str:
    return f"{zlib.crc32(id_key(rid)):08x}"


def _openai_result(rid, text, finish_reason, prompt_tokens, completion_tokens, model, chat) -> dict:
    """An OpenAI batch output line; its body a `chat.completion` (messages) or a `text_completion` (a prompt)."""
    if chat:
        body_id, kind = f"chatcmpl-{_suffix(rid)}", "chat.completion"
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        body_id, kind = f"cmpl-{_suffix(rid)}", "text_completion"
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    body = {"id": body_id, "object": kind, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage}
    return {"id": f"batch_req_{_suffix(rid)}", "custom_id": rid,
            "response": {"status_code": 200, "request_id": f"req_{_suffix(rid)}", "body": body}, "error": None}
