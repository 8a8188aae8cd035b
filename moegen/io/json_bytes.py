"""JSON to and from bytes: orjson where it is installed (fast: a results line per request), else the
standard library, so a machine without orjson still runs every job.

Both write the same compact UTF-8 (no spaces, non-ASCII as is) and, with `indent`, two-space
indentation; a float in exponent form is spelled differently (`1e-7`, `1e-07`), the same number.
`JSONDecodeError` catches either's decoding error (orjson's subclasses the standard one). A NaN or
infinite float is written `null` by orjson and `NaN` / `Infinity` by the standard library (no job
writes one; a bench number may).
"""

from __future__ import annotations

import json
from json import JSONDecodeError
from typing import Any

try:
    import orjson
except ImportError:  # the standard library's, a few times slower
    orjson = None

__all__ = ["JSONDecodeError", "dumps", "loads"]


def dumps(obj: Any, indent: bool = False, sort_keys: bool = False) -> bytes:
    if orjson is not None:
        return orjson.dumps(obj, option=(orjson.OPT_INDENT_2 if indent else 0)
                            | (orjson.OPT_SORT_KEYS if sort_keys else 0))
    return json.dumps(obj, ensure_ascii=False, sort_keys=sort_keys, indent=2 if indent else None,
                      separators=(",", ": ") if indent else (",", ":")).encode()


def loads(data: bytes | str) -> Any:
    if orjson is not None:
        return orjson.loads(data)
    if isinstance(data, (bytes, bytearray)):
        try:
            data = data.decode()
        except UnicodeDecodeError as exc:  # orjson says this with its JSONDecodeError too
            raise JSONDecodeError(f"invalid UTF-8 ({exc.reason})", "", 0) from exc
    return json.loads(data)
