"""Tests for moegen.checkpoints.tokenizer: written files load with transformers and behave like Mixtral's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything must load from the written directory alone

from transformers import AutoTokenizer  # noqa: E402

from moegen.checkpoints.tokenizer import TokenizerInfo, write_tokenizer  # noqa: E402

# The chat template published with Mixtral-8x7B-Instruct-v0.1.
MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "In 2023, prices rose by 4.5% (from $19.99 to $20.89).",
    "Line one\nLine two\n\nLine four\n",
    " leading space and  double  spaces ",
    "Café, naïve, résumé — déjà vu.",
    "日本語のテキスト and 日本 mixed with English.",
    "emoji 🎉 and tab\tseparated",
    "def f(x):\n    return x ** 2  # squared\n",
    "",
]

SPM_ORACLE_TEXTS = [
    "Hello world",
    "The mixture of experts routes each token to two of eight experts.",
    "  indented text with   three spaces",
    "def f(x):\n        return x ** 2\n",
    "Numbers: 1234567890, 3.14159 and -42.",
    "Ünïcödé, 日本, 中文 and emoji 🎉🚀",
    "x" + " " * 17 + "y",
    "Trailing whitespace   \n\n",
]

VOCAB_BOUND = {"bpe": 512, "mixtral": 32000}


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    """Write-and-load each kind once per module: (kind, out_dir, info, loaded tokenizer)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            out_dir = tmp_path_factory.mktemp(kind)
            info = write_tokenizer(out_dir, kind, MIXTRAL_TEMPLATE)
            cache[kind] = kind, out_dir, info, AutoTokenizer.from_pretrained(out_dir)
        return cache[kind]

    return get


@pytest.fixture(scope="module", params=["bpe", "mixtral"])
def written(request, load):
    return load(request.param)


@pytest.fixture(scope="module")
def mixtral(load):
    return load("mixtral")


def test_info_matches_loaded_tokenizer(written):
    kind, _, info, tok = written
    assert isinstance(info, TokenizerInfo)
    assert tok.is_fast
    assert info.vocab_size == len(tok)
    assert info.vocab_size <= VOCAB_BOUND[kind]
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert (info.bos_token_id, info.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert info.pad_token_id == tok.pad_token_id
    assert max(tok.get_vocab().values()) < info.vocab_size  # every id fits an embedding of vocab_size rows


def test_mixtral_ids_are_the_real_ones(mixtral):
    _, _, info, _ = mixtral
    assert info == TokenizerInfo(vocab_size=32000, bos_token_id=1, eos_token_id=2, pad_token_id=None)


def test_bos_is_prepended_and_eos_is_not(written):
    _, _, info, tok = written
    ids = tok("some text").input_ids
    assert ids[0] == info.bos_token_id
    assert ids.count(info.bos_token_id) == 1
    assert info.eos_token_id not in ids
    assert tok("some text", add_special_tokens=False).input_ids == ids[1:]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_round_trips(written, text):
    _, _, _, tok = written
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_chat_template_is_stored_and_applies(written):
    _, out_dir, info, tok = written
    config = json.loads((out_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == MIXTRAL_TEMPLATE
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<s>[INST] What is the capital of France? [/INST]"
    # The rendered "<s>" must become the BOS id, not the characters "<", "s", ">".
    ids = tok(prompt, add_special_tokens=False).input_ids
    assert ids[0] == info.bos_token_id and ids.count(info.bos_token_id) == 1


@pytest.mark.parametrize("kind", ["bpe", "mixtral"])
def test_output_is_deterministic(tmp_path, kind):
    first, second = tmp_path / "a", tmp_path / "b"
    assert write_tokenizer(first, kind, "t") == write_tokenizer(second, kind, "t")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_mixtral_matches_sentencepiece(mixtral):
    _, out_dir, info, tok = mixtral
    import sentencepiece

    # Independent oracle: the original model, run by the sentencepiece library itself.
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    for text in SPM_ORACLE_TEXTS:
        assert tok(text).input_ids == [info.bos_token_id, *sp.encode(text)], text


def test_mixtral_chat_matches_mistral_common(mixtral):
    _, _, _, tok = mixtral
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    content = "What is the capital of France?"
    expected = MistralTokenizer.v1().encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content=content)])
    ).tokens
    got = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    got = got["input_ids"] if not isinstance(got, list) else got
    assert got == expected


def test_mixtral_loads_without_sentencepiece(mixtral):
    _, out_dir, _, tok = mixtral
    # A fresh interpreter where importing sentencepiece fails, as on a serving box without it.
    script = (
        "import sys; sys.modules['sentencepiece'] = None\n"
        "from transformers import AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(out_dir)!r})\n"
        "print(tok('Hello world, 日本').input_ids)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == tok("Hello world, 日本").input_ids


def test_loads_next_to_a_mixtral_model_config(written, tmp_path):
    # With config.json present, transformers 5 routes by model_type first; the result must not change.
    _, out_dir, _, tok = written
    for path in out_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}), encoding="utf-8")
    beside_config = AutoTokenizer.from_pretrained(tmp_path)
    for text in ROUND_TRIP_TEXTS:
        assert beside_config(text).input_ids == tok(text).input_ids


def test_bpe_write_removes_stale_sentencepiece_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"stale")
    write_tokenizer(tmp_path, "bpe", "t")
    assert not (tmp_path / "tokenizer.model").exists()


def test_missing_mistral_common_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mistral_common", None)  # makes `import mistral_common` fail
    with pytest.raises(RuntimeError, match=r"tokenizer\.model\.v1.*pip install mistral-common"):
        write_tokenizer(tmp_path, "mixtral", "t")


def test_unknown_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        write_tokenizer(tmp_path, "wordpiece", "t")  # type: ignore[arg-type]
