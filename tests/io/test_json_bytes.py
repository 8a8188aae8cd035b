"""moegen's JSON without orjson writes the bytes orjson writes, and reads what it reads."""

from __future__ import annotations

import orjson
import pytest

from moegen.io import json_bytes

VALUES = [
    {"id": 3, "text": "naïve café — 日本語 \"quoted\"\n\ttab", "token_ids": [1, 2, 3], "finish_reason": "length",
     "error": None, "ok": True},
    {"b": 0.1, "a": [12345.678, -2.5, 1 / 3], "nested": {"z": [], "y": {}, "x": [[1, 2], (3, 4)]}},
    "3", 3, 3.0, [],
]


@pytest.mark.parametrize("value", VALUES)
def test_standard_library_fallback_writes_orjsons_bytes(value, monkeypatch):
    want = [orjson.dumps(value), orjson.dumps(value, option=orjson.OPT_INDENT_2),
            orjson.dumps(value, option=orjson.OPT_SORT_KEYS)]
    monkeypatch.setattr(json_bytes, "orjson", None)
    got = [json_bytes.dumps(value), json_bytes.dumps(value, indent=True), json_bytes.dumps(value, sort_keys=True)]
    assert got == want
    assert json_bytes.loads(want[0]) == orjson.loads(want[0]) and json_bytes.loads(want[0].decode()) == orjson.loads(want[0])


def test_exponents_are_spelled_differently_but_read_back_the_same(monkeypatch):
    floats = [1e-7, 1e300, 5e-324, 2.5e-5]
    want = orjson.dumps(floats)
    monkeypatch.setattr(json_bytes, "orjson", None)
    assert orjson.loads(json_bytes.dumps(floats)) == floats == json_bytes.loads(want)


@pytest.mark.parametrize("use_orjson", [True, False])
def test_bad_input_raises_the_one_decode_error(use_orjson, monkeypatch):
    if not use_orjson:
        monkeypatch.setattr(json_bytes, "orjson", None)
    for bad in (b'{"prompt": "\xff\xfe"}', b'{"prompt": ', "[1, 2"):
        with pytest.raises(json_bytes.JSONDecodeError):
            json_bytes.loads(bad)
