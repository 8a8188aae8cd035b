"""`--output-format openai`: every line is an OpenAI batch output record that the official `openai` package's
own types accept, its body a `chat.completion` for messages and a `text_completion` for a prompt.

Oracles: the `openai` package's pydantic models (`ChatCompletion`, `Completion`, `BatchError`) for the shape,
transformers' greedy `generate` for the content (tests/io/test_serve_offline.py's Oracle).
"""

from __future__ import annotations

import pytest
from openai.types import BatchError, Completion
from openai.types.chat import ChatCompletion

from tests.io.test_serve_offline import (MESSAGES, PROMPTS, by_id, model_dir, ok, oracle, read_lines, serve,  # noqa: F401
                                         write_jsonl)

BATCH_KEYS = {"id", "custom_id", "response", "error"}


def batch_line(custom_id, url, body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "tiny", **body}}


def validate(record: dict):
    """The record's body (or its error) parsed by the openai package's types: raises where any does not fit."""
    assert set(record) == BATCH_KEYS, record
    assert isinstance(record["id"], str) and record["id"]
    if record["response"] is None:
        error = BatchError.model_validate(record["error"])
        assert error.code and error.message
        return error
    assert record["error"] is None
    response = record["response"]
    assert set(response) == {"status_code", "request_id", "body"} and response["status_code"] == 200
    assert isinstance(response["request_id"], str) and response["request_id"]
    body = response["body"]
    kind = {"chat.completion": ChatCompletion, "text_completion": Completion}[body["object"]]
    return kind.model_validate(body, strict=True)


def test_validate_rejects_what_openai_rejects():
    """The oracle bites: a chat body without an id (what moegen once wrote) does not validate."""
    body = {"object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop", "logprobs": None}]}
    record = {"id": "batch_req_1", "custom_id": "a", "error": None,
              "response": {"status_code": 200, "request_id": "req_1", "body": body}}
    with pytest.raises(ValueError):
        validate(record)
    body["id"] = "chatcmpl-1"
    assert validate(record).choices[0].message.content == "x"


def test_mixed_batch_validates_with_the_openai_types(model_dir, oracle, tmp_path):
    lines = [
        batch_line("chat", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4}),
        batch_line("text", "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 5}),
        batch_line("text-no-url", None, {"prompt": PROMPTS[2], "max_tokens": 3}),
        batch_line("bad-temperature", "/v1/completions", {"prompt": PROMPTS[1], "temperature": -1}),
        batch_line("prompt-to-chat", "/v1/chat/completions", {"prompt": PROMPTS[1]}),
        batch_line("embeddings", "/v1/embeddings", {"prompt": PROMPTS[1]}),
    ]
    del lines[2]["url"]
    dataset = write_jsonl(tmp_path / "batch.jsonl", lines)
    out = tmp_path / "out.jsonl"
    ok(serve(model_dir, dataset, out, "--format", "openai", "--output-format", "openai"))
    records = read_lines(out)
    got = by_id(records, key="custom_id")
    assert set(got) == {line["custom_id"] for line in lines}
    assert len({r["id"] for r in records}) == len(records)  # batch ids are distinct
    parsed = {cid: validate(record) for cid, record in got.items()}  # every line, errors too

    chat = parsed["chat"]
    assert isinstance(chat, ChatCompletion) and chat.object == "chat.completion"
    exp = oracle.expected(oracle.chat_ids(MESSAGES), 4)
    (choice,) = chat.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant", exp["text"], exp["finish_reason"])
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (
        exp["prompt_tokens"], exp["completion_tokens"], exp["prompt_tokens"] + exp["completion_tokens"])

    for cid, prompt, n in (("text", PROMPTS[0], 5), ("text-no-url", PROMPTS[2], 3)):
        text = parsed[cid]
        assert isinstance(text, Completion) and text.object == "text_completion", cid
        exp = oracle.expected(oracle.prompt_ids(prompt), n)
        (choice,) = text.choices
        assert (choice.text, choice.finish_reason, choice.logprobs) == (exp["text"], exp["finish_reason"], None)
        assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (
            exp["prompt_tokens"], exp["completion_tokens"])
    assert len({parsed[c].id for c in ("chat", "text", "text-no-url")}) == 3

    for cid, words in (("bad-temperature", ["temperature"]),
                       ("prompt-to-chat", ["/v1/chat/completions", "messages", "/v1/completions"]),
                       ("embeddings", ["/v1/embeddings", "/v1/chat/completions", "/v1/completions"])):
        error = parsed[cid]
        assert isinstance(error, BatchError) and got[cid]["response"] is None, cid
        assert all(w in error.message for w in words), (cid, error.message)

    # resume keys on custom_id in this shape: nothing to do, nothing written
    before = out.read_bytes()
    result = ok(serve(model_dir, dataset, out, "--format", "openai", "--output-format", "openai", "--resume"))
    assert out.read_bytes() == before
    assert f"{len(lines)} already done" in result.stderr


def test_moegen_rows_answered_by_kind(model_dir, tmp_path):
    """Rows in moegen's own shape: messages -> chat.completion, a prompt -> text_completion."""
    dataset = write_jsonl(tmp_path / "data.jsonl", [{"prompt": PROMPTS[1]}, {"messages": MESSAGES}])
    out = tmp_path / "out.jsonl"
    ok(serve(model_dir, dataset, out, "--output-format", "openai", max_new=2))
    got = by_id(read_lines(out), key="custom_id")
    assert isinstance(validate(got[0]), Completion) and isinstance(validate(got[1]), ChatCompletion)
