"""`moegen serve-offline` end to end through the CLI, checked by re-reading the output file.

Oracles: transformers' greedy `generate` (float32) on the prompt ids alone, the tokenizer's own
`__call__` / `apply_chat_template` / `decode`, config.json, and hand-computed values. Nothing is
compared against moegen output captured once.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything must load from the checkpoint directory alone

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from moegen.cli import main  # noqa: E402

MAX_NEW = 6
PROMPTS = ["The mixture of experts routes each token", "Hi", "Once upon a time"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
RESULT_KEYS = {"id", "text", "finish_reason", "prompt_tokens", "completion_tokens"}


# --------------------------------------------------------------------------------------------- oracle


class Oracle:
    """transformers + the checkpoint's tokenizer, loaded once per module."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        eos = json.loads((self.dir / "generation_config.json").read_text())["eos_token_id"]
        self.eos = set(eos) if isinstance(eos, list) else {eos}
        self.context = json.loads((self.dir / "config.json").read_text())["max_position_embeddings"]
        self._greedy: dict = {}

    def prompt_ids(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    def chat_ids(self, messages: list, template: str | None = None) -> list[int]:
        extra = {"chat_template": template} if template is not None else {}
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """transformers' greedy continuation of `ids` alone: the generated ids only."""
        key = (tuple(ids), n)
        if key not in self._greedy:
            x = torch.tensor([ids])
            with torch.no_grad():
                out = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                          pad_token_id=0)
            self._greedy[key] = out[0, len(ids):].tolist()
        return self._greedy[key]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def expected(self, ids: list[int], n: int, stops: tuple[str, ...] = ()) -> dict:
        """The result line for a greedy request: generation stops at the first token after which the decoded
        completion contains a stop string, and the text is cut before that string's first occurrence."""
        gen = self.greedy(ids, n)
        for k in range(1, len(gen) + 1):
            partial = self.decode(gen[:k])
            found = [partial.find(s) for s in stops if s in partial]
            if found:
                return {"text": partial[:min(found)], "finish_reason": "stop", "prompt_tokens": len(ids),
                        "completion_tokens": k}
        hit_eos = gen[-1] in self.eos
        assert hit_eos or len(gen) == n
        return {"text": self.decode(gen), "finish_reason": "stop" if hit_eos else "length",
                "prompt_tokens": len(ids), "completion_tokens": len(gen)}


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("olmoe")


@pytest.fixture(scope="module")
def oracle(model_dir):
    return Oracle(model_dir)


# -------------------------------------------------------------------------------------------- helpers


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def serve(model_dir, dataset, output, *extra, max_new=MAX_NEW):
    return invoke("serve-offline", model_dir, "--dataset", dataset, "--output", output, "--max-new-tokens", max_new,
                  *extra)


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Traceback" not in result.output
    return result


def failed(result):
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception  # a clean error, not a crash
    assert "Traceback" not in result.output
    return result


def read_lines(path: Path) -> list[dict]:
    """Every line of the results file, parsed with the standard library; the file ends with a newline."""
    data = Path(path).read_bytes()
    assert data == b"" or data.endswith(b"\n"), data[-80:]
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def by_id(records: list[dict], key: str = "id") -> dict:
    counts = Counter(json.dumps(r[key]) for r in records)
    assert all(c == 1 for c in counts.values()), counts  # every id exactly once
    return {r[key]: r for r in records}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def check_result(record: dict, expected: dict) -> None:
    assert set(record) == RESULT_KEYS, record
    got = {k: record[k] for k in ("text", "finish_reason", "prompt_tokens", "completion_tokens")}
    assert got == expected, (record["id"], got, expected)


# ---------------------------------------------------------------------------------------- 1. formats


def _rows():
    """Four requests: three prompts and one chat; row 2 asks for fewer tokens than the CLI default."""
    return [{"prompt": PROMPTS[0]}, {"messages": MESSAGES}, {"prompt": PROMPTS[1], "max_tokens": 3},
            {"prompt": PROMPTS[2]}]


def _write_dataset(tmp_path: Path, fmt: str, rows: list[dict]) -> Path:
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "data.jsonl", rows)
    if fmt == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows))
        return path
    if fmt == "csv":
        path = tmp_path / "data.csv"
        names = sorted({k for r in rows for k in r})
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if k == "messages" else v for k, v in r.items()})
        return path
    if fmt == "parquet":
        path = tmp_path / "data.parquet"
        names = sorted({k for r in rows for k in r})  # from_pylist would take the columns of row 0 alone
        pq.write_table(pa.table({k: [r.get(k) for r in rows] for k in names}), path)
        return path
    raise AssertionError(fmt)


def _expected_for(oracle: Oracle, row: dict) -> dict:
    ids = oracle.chat_ids(row["messages"]) if "messages" in row else oracle.prompt_ids(row["prompt"])
    return oracle.expected(ids, int(row.get("max_tokens", MAX_NEW)))


@pytest.mark.parametrize("fmt,id_field", [("jsonl", None), ("json", None), ("csv", None), ("parquet", None),
                                          ("jsonl", "key"), ("json", "key"), ("csv", "key"), ("parquet", "key")])
def test_every_input_format_matches_transformers(model_dir, oracle, tmp_path, fmt, id_field):
    rows = _rows()
    if id_field:
        for i, r in enumerate(rows):
            r[id_field] = f"req-{3 - i}"  # not the row index, so a mix-up shows
    dataset = _write_dataset(tmp_path, fmt, rows)
    out = tmp_path / "out.jsonl"
    ok(serve(model_dir, dataset, out, *(["--id-field", id_field] if id_field else [])))

    got = by_id(read_lines(out))
    ids = [r[id_field] for r in rows] if id_field else list(range(len(rows)))
    assert sorted(map(json.dumps, got)) == sorted(map(json.dumps, ids))
    for rid, row in zip(ids, rows):
        check_result(got[rid], _expected_for(oracle, row))
    assert got[ids[2]]["completion_tokens"] <= 3  # the row's max_tokens beat --max-new-tokens


def test_openai_batch_input(model_dir, oracle, tmp_path):
    rows = _rows()
    lines = []
    for i, r in enumerate(rows):
        body = {"model": "tiny", "max_tokens": r.pop("max_tokens", MAX_NEW), **r}
        url = "/v1/chat/completions" if "messages" in r else "/v1/completions"
        lines.append({"custom_id": f"task-{i}", "method": "POST", "url": url, "body": body})
    dataset = write_jsonl(tmp_path / "batch.jsonl", lines)  # .jsonl: the format must come from --format
    out = tmp_path / "out.jsonl"
    ok(serve(model_dir, dataset, out, "--format", "openai", max_new=2))  # every body names its own max_tokens

    got = by_id(read_lines(out))
    assert set(got) == {f"task-{i}" for i in range(len(rows))}
    for line in lines:
        row = dict(line["body"])
        check_result(got[line["custom_id"]], _expected_for(oracle, row))


def test_custom_prompt_and_messages_fields(model_dir, oracle, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", [{"q": PROMPTS[1]}, {"chat": MESSAGES, "q": "ignored"}])
    out = tmp_path / "out.jsonl"
    ok(serve(model_dir, dataset, out, "--prompt-field", "q", "--messages-field", "chat"))
    got = by_id(read_lines(out))
    check_result(got[0], oracle.expected(oracle.prompt_ids(PROMPTS[1]), MAX_NEW))
    check_result(got[1], oracle.expected(oracle.chat_ids(MESSAGES), MAX_NEW))  # messages win over the prompt


# ---------------------------------------------------------------------------------- 2. chat template

OVERRIDE_TEMPLATE = ("{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")


def test_chat_template_file_overrides_the_tokenizers(model_dir, oracle, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(OVERRIDE_TEMPLATE)
    short = [{"role": "user", "content": "Hello there"}]
    dataset = write_jsonl(tmp_path / "data.jsonl", [{"messages": MESSAGES}, {"messages": short},
                                                    {"prompt": PROMPTS[0]}])
    own, override = tmp_path / "own.jsonl", tmp_path / "override.jsonl"
    ok(serve(model_dir, dataset, own))
    ok(serve(model_dir, dataset, override, "--chat-template", template))

    own_lines, over_lines = by_id(read_lines(own)), by_id(read_lines(override))
    for rid, messages in ((0, MESSAGES), (1, short)):
        default_ids = oracle.chat_ids(messages)
        override_ids = oracle.chat_ids(messages, OVERRIDE_TEMPLATE)
        assert len(default_ids) != len(override_ids)  # the two templates tell apart in prompt_tokens
        check_result(own_lines[rid], oracle.expected(default_ids, MAX_NEW))
        check_result(over_lines[rid], oracle.expected(override_ids, MAX_NEW))
    for lines in (own_lines, over_lines):  # plain prompts don't go through any template
        check_result(lines[2], oracle.expected(oracle.prompt_ids(PROMPTS[0]), MAX_NEW))


# ------------------------------------------------------------------------------- 3. per-row overrides


def test_per_row_overrides_beat_the_cli(model_dir, oracle, tmp_path):
    rows = [
        {"prompt": PROMPTS[0], "max_tokens": 3},  # 0: OpenAI spelling
        {"prompt": PROMPTS[1], "max_new_tokens": 2},  # 1
        {"prompt": PROMPTS[2], "temperature": 1.0, "seed": 11},  # 2: samples
        {"prompt": PROMPTS[2], "temperature": 1.0, "seed": 12},  # 3: another seed
        {"prompt": PROMPTS[1], "temperature": 0},  # 4: greedy even under a sampling CLI
        {"prompt": PROMPTS[0]},  # 5: the CLI's settings
    ]
    dataset = write_jsonl(tmp_path / "data.jsonl", rows)
    first, again, sampled = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    ok(serve(model_dir, dataset, first))
    ok(serve(model_dir, dataset, again, "--temperature", "0", "--batch-size", "1"))
    ok(serve(model_dir, dataset, sampled, "--temperature", "1.0", "--seed", "5", "--top-k", "0"))
    a, b, c = (by_id(read_lines(p)) for p in (first, again, sampled))

    ids = [oracle.prompt_ids(r["prompt"]) for r in rows]
    for lines in (a, b):  # --temperature 0 (the default) is greedy
        check_result(lines[0], oracle.expected(ids[0], 3))
        check_result(lines[1], oracle.expected(ids[1], 2))
        check_result(lines[4], oracle.expected(ids[4], MAX_NEW))
        check_result(lines[5], oracle.expected(ids[5], MAX_NEW))
    assert a[0]["completion_tokens"] <= 3 and a[1]["completion_tokens"] <= 2
    greedy2 = oracle.expected(ids[2], MAX_NEW)["text"]
    for rid in (2, 3):
        # a row's own temperature + seed: the same text every run, whatever the batch or the CLI's seed/temperature
        assert a[rid]["text"] == b[rid]["text"] == c[rid]["text"]
        assert a[rid]["text"] != greedy2
        assert a[rid]["completion_tokens"] == MAX_NEW and a[rid]["prompt_tokens"] == len(ids[rid])
    assert a[2]["text"] != a[3]["text"]  # the seed matters
    # CLI --temperature 1: rows without their own temperature sample; a row's temperature 0 stays greedy
    check_result(c[4], oracle.expected(ids[4], MAX_NEW))
    assert c[5]["text"] != oracle.expected(ids[5], MAX_NEW)["text"]
    assert c[0]["completion_tokens"] == 3


# ------------------------------------------------------------------------------------ 4. stop strings


def _pick_stop(oracle: Oracle, ids: list[int], n: int) -> str:
    """Two consecutive tokens from the middle of the greedy completion whose text is clean and whose first
    occurrence ends before the completion does (a hand-chosen stop string that must stop it early)."""
    gen = oracle.greedy(ids, n)
    for j in range(len(gen) // 3, len(gen) - 2):
        stop = oracle.decode(gen[j:j + 2])
        if len(stop) >= 2 and stop.isprintable() and "\ufffd" not in stop:
            if oracle.expected(ids, n, (stop,))["completion_tokens"] < len(gen):
                return stop
    raise AssertionError(f"no usable stop string in {oracle.decode(gen)!r}")


def test_stop_strings_from_the_cli_and_per_row(model_dir, oracle, tmp_path):
    n = 8
    ids = [oracle.prompt_ids(p) for p in PROMPTS]
    cli_stop, row_stop = _pick_stop(oracle, ids[0], n), _pick_stop(oracle, ids[1], n)
    absent = "\u2603never\u2603"
    for i in (0, 1):
        full = oracle.decode(oracle.greedy(ids[i], n))
        assert absent not in full
    rows = [
        {"prompt": PROMPTS[0]},  # 0: the CLI's stop
        {"prompt": PROMPTS[1], "stop": row_stop},  # 1: its own, as one string
        {"prompt": PROMPTS[2]},  # 2: the CLI's stop, whatever it does to this completion
        {"prompt": PROMPTS[0], "stop": [absent]},  # 3: its own list replaces the CLI's
    ]
    dataset = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out.jsonl"
    ok(serve(model_dir, dataset, out, "--stop", cli_stop, "--stop", "\u2603also-never", max_new=n))
    got = by_id(read_lines(out))

    stopped0 = oracle.expected(ids[0], n, (cli_stop, "\u2603also-never"))
    full0 = oracle.decode(oracle.greedy(ids[0], n))
    assert stopped0["text"] == full0[:full0.find(cli_stop)] and stopped0["finish_reason"] == "stop"
    check_result(got[0], stopped0)
    assert got[0]["completion_tokens"] < len(oracle.greedy(ids[0], n))
    check_result(got[1], oracle.expected(ids[1], n, (row_stop,)))
    assert got[1]["finish_reason"] == "stop" and got[1]["completion_tokens"] < n
    check_result(got[2], oracle.expected(ids[2], n, (cli_stop, "\u2603also-never")))
    check_result(got[3], oracle.expected(ids[0], n))
    assert got[3]["text"] == full0 and cli_stop in got[3]["text"]


# 5. openai output format: tests/io/test_openai_output.py


# --------------------------------------------------------------------------------- 6. resume/overwrite


def test_existing_output_needs_resume_or_overwrite(model_dir, oracle, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": 0, "text": "precious"}\n')
    result = failed(serve(model_dir, dataset, out))
    assert "--resume" in result.stderr and "--overwrite" in result.stderr and str(out) in result.stderr
    assert out.read_bytes() == b'{"id": 0, "text": "precious"}\n'

    ok(serve(model_dir, dataset, out, "--overwrite"))
    got = by_id(read_lines(out))
    assert set(got) == {0, 1, 2}
    for i, p in enumerate(PROMPTS):
        check_result(got[i], oracle.expected(oracle.prompt_ids(p), MAX_NEW))

    before = out.read_bytes()
    result = ok(serve(model_dir, dataset, out, "--resume"))
    assert out.read_bytes() == before  # a complete output: nothing run, nothing written
    assert "0 ok, 0 failed, 3 already done (of 3)" in result.stderr


def test_resume_repairs_a_partial_last_line(model_dir, oracle, tmp_path):
    rows = [{"prompt": p} for p in PROMPTS] + [{"messages": MESSAGES}]
    dataset = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out.jsonl"
    ok(serve(model_dir, dataset, out))
    lines = out.read_bytes().split(b"\n")[:-1]
    assert len(lines) == 4
    lost = json.loads(lines[-1])["id"]
    kept = lines[:-1]
    out.write_bytes(b"".join(line + b"\n" for line in kept) + b'{"id": 7, "te')  # a crash mid-write

    result = ok(serve(model_dir, dataset, out, "--resume"))
    records = read_lines(out)  # every line parses
    got = by_id(records)  # each id exactly once
    assert set(got) == {0, 1, 2, 3}
    assert out.read_bytes().split(b"\n")[:3] == kept  # the finished lines were not rewritten
    row = rows[lost]
    ids = oracle.chat_ids(row["messages"]) if "messages" in row else oracle.prompt_ids(row["prompt"])
    check_result(got[lost], oracle.expected(ids, MAX_NEW))
    assert "1 ok, 0 failed, 3 already done (of 4)" in result.stderr
    assert "partial last line" in result.stderr


def test_resume_skips_errors_and_retry_errors_reruns_them(model_dir, oracle, tmp_path):
    bad = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "temperature": -1}, {"prompt": PROMPTS[2]}]
    dataset = write_jsonl(tmp_path / "data.jsonl", bad)
    out = tmp_path / "out.jsonl"
    ok(serve(model_dir, dataset, out))
    first = by_id(read_lines(out))
    assert set(first[1]) == {"id", "error"} and "temperature" in first[1]["error"]
    good_lines = [line for line in out.read_bytes().split(b"\n")[:-1] if b'"error"' not in line]
    assert len(good_lines) == 2

    fixed = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "temperature": 0}, {"prompt": PROMPTS[2]}]
    write_jsonl(dataset, fixed)
    before = out.read_bytes()
    result = ok(serve(model_dir, dataset, out, "--resume"))  # an error record counts as done
    assert out.read_bytes() == before
    assert "3 already done" in result.stderr

    result = ok(serve(model_dir, dataset, out, "--resume", "--retry-errors"))
    records = read_lines(out)
    got = by_id(records)
    assert set(got) == {0, 1, 2}
    assert not any("error" in r for r in records)
    check_result(got[1], oracle.expected(oracle.prompt_ids(PROMPTS[1]), MAX_NEW))
    assert out.read_bytes().split(b"\n")[:2] == good_lines  # the good rows were not run again
    assert "1 ok, 0 failed, 2 already done (of 3)" in result.stderr


def test_retry_errors_after_a_crash(model_dir, oracle, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "top_p": 0}])
    out = tmp_path / "out.jsonl"
    ok(serve(model_dir, dataset, out))
    with open(out, "ab") as f:
        f.write(b'{"id": 7, "te')
    write_jsonl(dataset, [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1]}])
    ok(serve(model_dir, dataset, out, "--resume", "--retry-errors"))
    got = by_id(read_lines(out))
    assert set(got) == {0, 1}
    check_result(got[1], oracle.expected(oracle.prompt_ids(PROMPTS[1]), MAX_NEW))


def test_fixing_a_malformed_line_then_retrying_runs_every_row_once(model_dir, oracle, tmp_path):
    prompts = ["Alpha", "Beta", "Gamma"]
    dataset = tmp_path / "data.jsonl"
    dataset.write_bytes(b'{"prompt": "Alpha"}\n{"prompt": "Beta"\n{"prompt": "Gamma"}\n')
    out = tmp_path / "out.jsonl"
    ok(serve(model_dir, dataset, out))
    write_jsonl(dataset, [{"prompt": p} for p in prompts])
    ok(serve(model_dir, dataset, out, "--resume", "--retry-errors"))
    texts = sorted(r["text"] for r in read_lines(out))
    assert texts == sorted(oracle.expected(oracle.prompt_ids(p), MAX_NEW)["text"] for p in prompts)


# ------------------------------------------------------------------------------------------ 7. bad input


def _long_prompt(oracle: Oracle) -> str:
    text = "the quick brown fox jumps over the lazy dog. "
    while len(oracle.prompt_ids(text)) <= oracle.context:
        text *= 2
    return text


def test_bad_rows_become_error_records(model_dir, oracle, tmp_path):
    long = _long_prompt(oracle)
    lines = [
        {"key": "good-a", "prompt": PROMPTS[0]},  # line 1
        b'{"key": "bad-json", "prompt": "x"',  # line 2
        b'{"key": "bad-utf8", "prompt": "caf\xe9 \xff"}',  # line 3
        {"key": "no-prompt", "text": "hello"},  # line 4
        {"key": "empty", "prompt": ""},  # line 5
        {"key": "too-long", "prompt": long},  # line 6
        {"key": "neg-temp", "prompt": PROMPTS[1], "temperature": -1},  # line 7
        {"key": "zero-top-p", "prompt": PROMPTS[1], "top_p": 0},  # line 8
        {"key": "bad-max", "prompt": PROMPTS[1], "max_tokens": "x"},  # line 9
        {"key": "good-b", "messages": MESSAGES},  # line 10
    ]
    dataset = write_jsonl(tmp_path / "data.jsonl", lines)
    out = tmp_path / "out.jsonl"
    result = ok(serve(model_dir, dataset, out, "--id-field", "key"))
    got = by_id(read_lines(out))

    problems = {  # id -> (line, words its message must hold)
        "line:2": (2, ["malformed JSON"]),
        "line:3": (3, ["invalid UTF-8"]),
        "no-prompt": (4, ["missing", "'prompt'"]),
        "empty": (5, ["empty prompt"]),
        "too-long": (6, [str(len(oracle.prompt_ids(long))), f"{oracle.context}-token context"]),
        "neg-temp": (7, ["'temperature'", "-1"]),
        "zero-top-p": (8, ["'top_p'", "0"]),
        "bad-max": (9, ["max_", "number", "'x'"]),
    }
    assert set(got) == set(problems) | {"good-a", "good-b"}
    for rid, (line, words) in problems.items():
        rec = got[rid]
        assert set(rec) == {"id", "error"}, rec
        assert str(dataset) in rec["error"] and f"line {line}" in rec["error"], rec
        for word in words:
            assert word in rec["error"], (word, rec)
    check_result(got["good-a"], oracle.expected(oracle.prompt_ids(PROMPTS[0]), MAX_NEW))
    check_result(got["good-b"], oracle.expected(oracle.chat_ids(MESSAGES), MAX_NEW))
    assert "requests: 2 ok, 8 failed (of 10)" in result.stderr


@pytest.mark.parametrize("bad,words", [
    ({"prompt": PROMPTS[1], "temperature": -1}, ["'temperature'"]),
    ({"text": PROMPTS[1]}, ["'prompt'"]),
    ({"prompt": PROMPTS[1], "max_new_tokens": 0}, ["'max_new_tokens'"]),
])
def test_on_error_fail_stops_at_the_first_bad_row(model_dir, tmp_path, bad, words):
    rows = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[2]}, bad, {"prompt": PROMPTS[0]}, {"prompt": "later"}]
    dataset = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out.jsonl"
    result = failed(serve(model_dir, dataset, out, "--on-error", "fail"))
    assert str(dataset) in result.stderr and "line 3" in result.stderr
    for word in words:
        assert word in result.stderr
    records = read_lines(out) if out.exists() else []
    assert all("error" not in r and r["id"] in (0, 1) for r in records), records  # nothing at or after line 3


def test_fatal_errors_write_nothing(model_dir, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", [{"prompt": PROMPTS[0]}])
    out = tmp_path / "out.jsonl"

    missing = tmp_path / "nope.jsonl"
    result = failed(serve(model_dir, missing, out))
    assert str(missing) in result.stderr and not out.exists()

    no_model = tmp_path / "no-such-model"
    result = failed(serve(no_model, dataset, out))
    assert str(no_model) in result.stderr and not out.exists()

    odd = tmp_path / "data.txt"
    odd.write_text('{"prompt": "x"}\n')
    result = failed(serve(model_dir, odd, out))
    assert "--format" in result.stderr and not out.exists()

    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "x"},')
    result = failed(serve(model_dir, broken, out))
    assert str(broken) in result.stderr and not out.exists()

    result = serve(model_dir, dataset, tmp_path)  # --output is a directory: a usage error
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert str(tmp_path) in result.stderr and "directory" in result.stderr


def test_an_unusable_model_dir_leaves_the_output_alone(tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "top_p": 0}])
    empty_model = tmp_path / "model"  # a directory, but no checkpoint in it
    empty_model.mkdir()
    out = tmp_path / "out.jsonl"
    result = failed(serve(empty_model, dataset, out))
    assert "config.json" in result.stderr and not out.exists()
    precious = b'{"id": 0, "text": "precious"}\n{"id": 1, "error": "bad"}\n{"id": 2, "te'
    out.write_bytes(precious)
    for flags in (["--overwrite"], ["--resume"], ["--resume", "--retry-errors"]):
        failed(serve(empty_model, dataset, out, *flags))
        assert out.read_bytes() == precious, flags  # not deleted, not trimmed, no error line dropped


def test_repeated_ids_are_refused_before_anything_runs(model_dir, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", [{"key": "a", "prompt": PROMPTS[0]}, {"key": "b", "prompt": "x"},
                                                    {"key": "a", "prompt": PROMPTS[1]}])
    out = tmp_path / "out.jsonl"
    result = failed(serve(model_dir, dataset, out, "--id-field", "key"))
    assert str(dataset) in result.stderr and "line 3" in result.stderr and "line 1" in result.stderr
    assert "'a'" in result.stderr and not out.exists()


def test_nan_temperature_is_an_error_record(model_dir, tmp_path):
    dataset = tmp_path / "data.csv"
    dataset.write_text("prompt,temperature\nHi,nan\n")
    out = tmp_path / "out.jsonl"
    ok(serve(model_dir, dataset, out))
    (rec,) = read_lines(out)
    assert "error" in rec and "temperature" in rec["error"]


# ------------------------------------------------------------------- 8-9. stats, summary, plain progress


def test_stats_json_summary_and_plain_progress(model_dir, oracle, tmp_path):
    """A real process with stderr on a pipe (not a TTY): the progress is plain lines."""
    rows = [{"prompt": PROMPTS[0]}, {"messages": MESSAGES}, {"prompt": PROMPTS[1], "temperature": -1},
            {"prompt": PROMPTS[2], "max_tokens": 4}]
    dataset = write_jsonl(tmp_path / "data.jsonl", rows)
    out, stats_path = tmp_path / "out.jsonl", tmp_path / "stats.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "-m", "moegen.cli", "serve-offline", str(model_dir), "--dataset",
                           str(dataset), "--output", str(out), "--max-new-tokens", str(MAX_NEW), "--stats-json",
                           str(stats_path)], capture_output=True, timeout=180, env=env)  # bytes: text mode would turn \r into \n
    err = proc.stderr.decode("utf-8")
    assert proc.returncode == 0, err
    assert proc.stdout == b""  # results go to the file only
    assert "\r" not in err and "\x1b" not in err  # no bar redraws off a terminal
    lines = re.findall(r"^moegen: (\d+)/3 requests, (\d+) in flight, [0-9.]+ generated tok/s, .*ETA ([0-9.]+)s$",
                       err, re.M)
    assert lines and lines[-1][0] == "3", err  # the last line when the last request finished
    assert lines[0][0] == "0", err  # the first line at once, with an ETA (the plan's)

    records = read_lines(out)
    results = [r for r in records if "error" not in r]
    assert len(results) == 3 and len(records) == 4
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    generated = sum(r["completion_tokens"] for r in results)
    expected_ids = [oracle.prompt_ids(PROMPTS[0]), oracle.chat_ids(MESSAGES), oracle.prompt_ids(PROMPTS[2])]
    assert prompt_tokens == sum(map(len, expected_ids))
    assert generated == sum(oracle.expected(ids, n)["completion_tokens"]
                            for ids, n in zip(expected_ids, (MAX_NEW, MAX_NEW, 4)))

    stats = json.loads(stats_path.read_text())
    assert stats["ok"] == 3 and stats["failed"] == 1
    assert stats["prompt_tokens"] == prompt_tokens and stats["generated_tokens"] == generated
    assert stats["wall_s"] > 0 and stats["prefill_tok_s"] > 0 and stats["decode_tok_s"] > 0
    # both rates are over the same generation time, which lies within the wall time
    gen_s = stats["generated_tokens"] / stats["decode_tok_s"]
    assert stats["prompt_tokens"] / stats["prefill_tok_s"] == pytest.approx(gen_s, rel=1e-6)
    assert gen_s <= stats["wall_s"]
    assert 0.05 < stats["peak_host_memory_gib"] < 64  # torch alone takes more than 50 MiB

    assert "moegen: requests: 3 ok, 1 failed (of 4)" in err
    assert f"moegen: tokens: {prompt_tokens} prompt, {generated} generated" in err
    rates = re.search(r"^moegen: throughput over the run: ([0-9.]+) prompt tok/s, ([0-9.]+) generated tok/s", err, re.M)
    assert rates, err
    assert float(rates[1]) == pytest.approx(stats["prefill_tok_s"], abs=0.051)
    assert float(rates[2]) == pytest.approx(stats["decode_tok_s"], abs=0.051)


def test_a_broken_chat_template_is_a_per_row_error(model_dir, oracle, tmp_path):
    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] | no_such_filter }}{% endfor %}")
    dataset = write_jsonl(tmp_path / "data.jsonl", [{"messages": MESSAGES}, {"prompt": PROMPTS[0]}])
    out = tmp_path / "out.jsonl"
    ok(serve(model_dir, dataset, out, "--chat-template", template))
    got = by_id(read_lines(out))
    assert "no_such_filter" in got[0]["error"] and "line 1" in got[0]["error"]
    check_result(got[1], oracle.expected(oracle.prompt_ids(PROMPTS[0]), MAX_NEW))


def test_ignore_eos_runs_to_max_tokens_and_token_ids_are_the_completion(model_dir, oracle, tmp_path):
    """--ignore-eos: every request generates exactly --max-new-tokens; --output-token-ids writes the ids,
    which are transformers' greedy ids (min_new_tokens keeps it from stopping at EOS either)."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p} for p in PROMPTS])
    out = tmp_path / "out.jsonl"
    ok(serve(model_dir, data, out, "--ignore-eos", "--output-token-ids", max_new=12))
    records = by_id(read_lines(out))
    for i, prompt in enumerate(PROMPTS):
        ids = oracle.prompt_ids(prompt)
        x = torch.tensor([ids])
        with torch.no_grad():
            want = oracle.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                                         min_new_tokens=12, pad_token_id=0)[0, len(ids):].tolist()
        record = records[i]
        assert set(record) == RESULT_KEYS | {"token_ids"}
        assert record["token_ids"] == want and record["completion_tokens"] == 12
        assert record["finish_reason"] == "length" and record["text"] == oracle.decode(want)


def test_peak_memory_is_the_jobs_own_not_its_parents():
    """A job started from a process holding 1 GiB must not report that GiB (ru_maxrss is inherited
    across fork + exec on Linux; the summary's peak host memory is the job's own)."""
    held = bytearray(2**30)
    held[:: 4096] = b"\x01" * len(held[:: 4096])  # touch every page, so it is resident
    probe = "from moegen.serve import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < 0.75 * 2**30, child
    del held
