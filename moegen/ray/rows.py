"""Rows between Ray and an engine: what goes in (a user's columns, or a dataset row serve-offline parsed)
and what comes out (the record serve-offline writes, and its fields as columns)."""

from __future__ import annotations

import zlib
from dataclasses import asdict
from typing import Any

from moegen.io import json_bytes
from moegen.io.dataset import Fields, Row, object_row
from moegen.io.results import id_key

ROW, INDEX = "moegen_row", "moegen_index"  # serve-offline --ray's parsed rows: the Row as JSON, its place in the file
COLUMNS = ("id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error", "record")


def parsed(row: Row, index: int) -> dict:
    """A dataset row serve-offline parsed, as a Ray row."""
    return {ROW: json_bytes.dumps(asdict(row)), INDEX: index}


def rows_of(batch: dict[str, Any], fields: Fields, source: str) -> list[tuple[Row, int]]:
    """(Row, its number) per row of a Ray batch. A parsed row keeps its place in the file (its default seed
    is --seed plus that, as in one process); a user's row is read as serve-offline reads a dataset row,
    numbered by a hash of its id (a Ray dataset has no global row order)."""
    if ROW in batch:
        return [(Row(**json_bytes.loads(bytes(data))), int(index)) for data, index in zip(batch[ROW], batch[INDEX])]
    names = list(batch)
    count = len(batch[names[0]]) if names else 0
    out = []
    for i in range(count):
        obj = {name: _plain(batch[name][i]) for name in names}
        obj = {k: v for k, v in obj.items() if v is not None}
        rid = obj.get(fields.id) if fields.id else None
        row = object_row(obj, 0, f"row id {rid!r}", fields, source)
        if row.error is None and fields.id is None:
            row.error = f"{source}: moegen.ray needs an id column (MoegenConfig.fields.id)"
        out.append((row, zlib.crc32(id_key(row.id)) & 0x7FFFFFFF))
    return out


def columns(records: list[dict]) -> dict[str, list]:
    """Output rows as columns (Ray's batch); each record dict has every COLUMNS key."""
    return {name: [r[name] for r in records] for name in COLUMNS}


def output_row(rid: Any, record: dict, text=None, finish_reason=None, prompt_tokens=None, completion_tokens=None,
               error=None) -> dict:
    """An output row. Its id is the row's id in JSON (3, "a": the spelling results are keyed by), so that one
    column holds every row's, whatever their types (a dataset line that is not JSON is "line:N")."""
    return {"id": id_key(rid).decode(), "text": text, "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "error": error, "record": json_bytes.dumps(record)}


def _plain(value: Any) -> Any:
    """A numpy or Arrow cell as plain Python (lists, dicts, str, int, float, None)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
