"""Failures a user provokes before any work: each names the input, the problem and the fix, with no traceback."""

from __future__ import annotations

import json
import shutil

from tests.io.test_serve_offline import PROMPTS, failed, invoke, model_dir, serve, write_jsonl  # noqa: F401


def test_an_output_that_cannot_be_written_is_said_before_any_work(model_dir, tmp_path):
    dataset = write_jsonl(tmp_path / "data.jsonl", [{"prompt": PROMPTS[0]}])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = failed(serve(model_dir, dataset, blocker / "out.jsonl"))
    assert "--output" in result.stderr and str(blocker / "out.jsonl") in result.stderr
    assert "writable folder" in result.stderr and "plan:" not in result.stderr  # before planning, loading, running
    result = failed(serve(model_dir, dataset, tmp_path / "out.jsonl", "--stats-json", blocker / "stats.json"))
    assert "--stats-json" in result.stderr and "writable folder" in result.stderr and "plan:" not in result.stderr


def test_a_config_field_of_the_wrong_type_names_the_file(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] = "two"
    (broken / "config.json").write_text(json.dumps(config))
    result = failed(invoke("generate", broken, "--prompt", "hi", "--max-new-tokens", "2"))
    assert str(broken / "config.json") in result.stderr and "correct that in config.json" in result.stderr


def test_a_checkpoint_without_tokenizer_files_says_so(model_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    result = failed(invoke("generate", bare, "--prompt", "hi", "--max-new-tokens", "2"))
    assert str(bare) in result.stderr and "no tokenizer files" in result.stderr and "copy" in result.stderr
