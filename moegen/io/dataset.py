"""Read a dataset of requests: JSONL, JSON (an array), CSV, Parquet, or the OpenAI batch format.

Every row becomes a `Row`: its id, where it is in the file, a prompt or chat messages, and its
own sampling overrides. A row that can't be read becomes a `Row` with an `error` instead, so the
job can record it and go on; a file that can't be read at all is a `DatasetError`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from moegen.io import json_bytes

FORMATS = ("jsonl", "json", "csv", "parquet", "openai")
ENDPOINTS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}  # an OpenAI batch line's url -> its body
# Per-row override fields -> Request field. `max_tokens` is the OpenAI spelling.
OVERRIDES = {"max_tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens", "temperature": "temperature",
             "top_p": "top_p", "top_k": "top_k", "seed": "seed", "stop": "stop"}


class DatasetError(ValueError):
    """The dataset file can't be read at all (before any work)."""


@dataclass(slots=True)
class Row:
    id: Any  # the request's id in the output
    where: str  # "line 12" / "row 3": for error messages
    prompt: str | None = None
    messages: list | None = None
    params: dict = field(default_factory=dict)  # Request field -> raw value from the row
    param_names: dict = field(default_factory=dict)  # Request field -> the row's own spelling (for errors)
    error: str | None = None  # why the row can't run

    @property
    def chat(self) -> bool:
        """Answered as a chat completion (messages), else as a text completion (a prompt)."""
        return self.messages is not None


@dataclass(frozen=True, slots=True)
class Fields:
    prompt: str = "prompt"
    messages: str = "messages"
    id: str | None = None  # None: the 0-based row index (OpenAI: custom_id)


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("jsonl", "ndjson"):
        return "jsonl"
    if suffix in ("json", "csv", "parquet"):
        return suffix
    raise DatasetError(f"{path}: can't tell the format from the extension {path.suffix!r}; "
                       f"pass --format {{{','.join(FORMATS)}}}")


def read_rows(path: Path, fmt: str | None = None, fields: Fields = Fields()) -> list[Row]:
    """All rows of the dataset, in order."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file; check the --dataset path")
    fmt = detect_format(path, fmt)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: can't read the dataset ({exc.strerror}); check the --dataset path and its "
                           "permissions") from exc
    return parse_rows(path, data, fmt, fields)


def parse_rows(path: Path, data: bytes, fmt: str, fields: Fields = Fields()) -> list[Row]:
    """The rows of a dataset file's bytes (read here, or by Ray: `moegen.ray`), `fmt` one of FORMATS."""
    reader = {"jsonl": _jsonl, "openai": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet}[fmt]
    return list(reader(Path(path), data, fields, fmt == "openai"))


def _jsonl(path: Path, data: bytes, fields: Fields, openai: bool) -> Iterator[Row]:
    index = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"line {number}"
        index += 1  # every non-empty line is a row: fixing a bad one later renumbers nothing
        try:
            obj = json_bytes.loads(raw)
        except json_bytes.JSONDecodeError as exc:
            kind, fix = (("invalid UTF-8", "save the file as UTF-8") if _bad_utf8(raw)
                         else ("malformed JSON", "write each line as one JSON object"))
            yield Row(id=f"line:{number}", where=where, error=f"{path}, {where}: {kind} ({exc}); {fix}")
            continue
        yield (_openai_row if openai else object_row)(obj, index - 1, where, fields, path)


def _bad_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _json(path: Path, data: bytes, fields: Fields, openai: bool) -> Iterator[Row]:
    try:
        items = json_bytes.loads(data)
    except json_bytes.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}); a .json dataset is one array of objects (for one "
                           "object per line, name it .jsonl or pass --format jsonl)") from exc
    if not isinstance(items, list):
        raise DatasetError(f"{path}: a .json dataset must be an array of objects, found {type(items).__name__}; "
                           "wrap the rows in [...] (or, for one object per line, pass --format jsonl)")
    for index, obj in enumerate(items):
        yield object_row(obj, index, f"row {index + 1}", fields, path)


def _csv(path: Path, data: bytes, fields: Fields, openai: bool) -> Iterator[Row]:
    text = data.decode("utf-8-sig", errors="surrogateescape")  # bad bytes become lone surrogates, per field
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for index, obj in enumerate(reader):
        where = f"line {reader.line_num}"
        if any(isinstance(v, str) and _has_surrogates(v) for v in obj.values()):
            yield Row(id=f"line:{reader.line_num}", where=where, error=f"{path}, {where}: invalid UTF-8; save the file as UTF-8")
            continue
        kept = {k: v for k, v in obj.items() if v != ""}  # an empty cell is an absent field...
        if fields.prompt in obj and fields.messages not in kept:
            kept.setdefault(fields.prompt, obj[fields.prompt])  # ...but an empty prompt is an empty prompt
        yield object_row(kept, index, where, fields, path)


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _parquet(path: Path, data: bytes, fields: Fields, openai: bool) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file ({exc}); check the file, or pass --format for "
                           "another format") from exc
    for index, obj in enumerate(table.to_pylist()):
        yield object_row({k: v for k, v in obj.items() if v is not None}, index, f"row {index + 1}", fields, path)


def object_row(obj: Any, index: int, where: str, fields: Fields, path: Path) -> Row:
    if not isinstance(obj, dict):
        return Row(id=f"line:{where.split()[-1]}", where=where,
                   error=f"{path}, {where}: a row must be an object, found {type(obj).__name__}; "
                         'write it as {"prompt": ...} or {"messages": [...]}')
    if fields.id is None:
        rid = index
    elif fields.id in obj:
        rid = obj[fields.id]
    else:
        return Row(id=f"line:{where.split()[-1]}", where=where, error=f"{path}, {where}: missing id field {fields.id!r}; "
                   "give the row one, or pass the dataset's id field as --id-field")
    row = Row(id=rid, where=where, params={OVERRIDES[k]: v for k, v in obj.items() if k in OVERRIDES},
              param_names={OVERRIDES[k]: k for k in obj if k in OVERRIDES})
    if fields.messages in obj:
        row.messages = obj[fields.messages]
        if isinstance(row.messages, str):  # CSV cells hold messages as JSON text
            try:
                row.messages = json_bytes.loads(row.messages)
            except json_bytes.JSONDecodeError:
                row.error = (f"{path}, {where}: field {fields.messages!r} is not valid JSON; write it as a JSON list of "
                             '{"role": ..., "content": ...} objects')
    elif fields.prompt in obj:
        row.prompt = obj[fields.prompt]
        if not isinstance(row.prompt, str):
            row.error = (f"{path}, {where}: field {fields.prompt!r} must be text, found {type(row.prompt).__name__}; "
                         "quote it as a string")
    else:
        row.error = (f"{path}, {where}: missing prompt field {fields.prompt!r} (or {fields.messages!r}); give the row "
                     "one, or name the dataset's fields with --prompt-field / --messages-field")
    return row


def _openai_row(obj: Any, index: int, where: str, fields: Fields, path: Path) -> Row:
    """{"custom_id", "method", "url", "body": {"messages" | "prompt", "max_tokens", "temperature", …}}."""
    if not isinstance(obj, dict) or "custom_id" not in obj:
        return Row(id=f"line:{where.split()[-1]}", where=where, error=f"{path}, {where}: missing 'custom_id'; "
                   "an OpenAI batch line needs a unique custom_id")
    body = obj.get("body")
    if not isinstance(body, dict):
        return Row(id=obj["custom_id"], where=where, error=f"{path}, {where}: missing 'body' object; "
                   "put the request (messages or prompt, max_tokens, ...) in a 'body' object")
    flat = dict(body)
    flat["__id"] = obj["custom_id"]
    row = object_row(flat, index, where, Fields(prompt="prompt", messages="messages", id="__id"), path)
    url = obj.get("url")
    if row.error is None and url is not None:
        takes = ENDPOINTS.get(url)
        if takes is None:
            row.error = (f"{path}, {where}: url {url!r} is not served; moegen answers "
                         f"{' and '.join(ENDPOINTS)} (or leave 'url' out)")
        elif (row.messages is not None) != (takes == "messages"):
            other = next(u for u, t in ENDPOINTS.items() if u != url)
            row.error = (f"{path}, {where}: url {url!r} takes body.{takes!r}, this body has "
                         f"{'messages' if row.messages is not None else 'a prompt'}; send it to {other!r}")
    return row
