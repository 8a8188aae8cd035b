"""Tests for the `moegen` command line (moegen.cli.main), with transformers as the generation oracle."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything must load from the written directory alone

from click.testing import CliRunner  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from moegen.checkpoints.make import make_model  # noqa: E402
from moegen.cli import main  # noqa: E402

PROMPTS = ["The mixture of experts routes each token", "Hi"]
MAX_NEW = 6


def disk_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def eos_ids(model_dir: Path) -> set[int]:
    """The EOS ids of generation_config.json, re-read from disk (an int or a list there)."""
    eos = json.loads((Path(model_dir) / "generation_config.json").read_text())["eos_token_id"]
    return set(eos) if isinstance(eos, list) else {eos}


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def hf_greedy(model, tokenizer, text: str, max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `text` alone (float32): the generated ids only."""
    ids = tokenizer(text)["input_ids"]
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory):
    """A tiny OLMoE-like checkpoint whose generation_config.json adds, as a second EOS, the third token
    transformers generates for PROMPTS[0]: so that prompt finishes with "stop" and the other with "length"."""
    out = tmp_path_factory.mktemp("cli") / "olmoe"
    make_model(out, "olmoe", "tiny", seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    first = hf_greedy(model, tokenizer, PROMPTS[0], MAX_NEW)
    gen_path = out / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    eos = gen["eos_token_id"]
    gen["eos_token_id"] = [eos, first[2]] if isinstance(eos, int) else [*eos, first[2]]
    gen_path.write_text(json.dumps(gen, indent=2))
    return out


def test_help_in_a_real_subprocess():
    exe = Path(sys.executable).parent / "moegen"
    cmd = [str(exe)] if exe.is_file() else [shutil.which("moegen")]
    assert cmd[0], "the moegen console script is not installed (pip install -e .)"
    proc = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "make-model" in proc.stdout and "generate" in proc.stdout
    assert proc.stderr == ""


def test_program_exits_with_the_commands_code_after_flushing_its_output(olmoe_dir, tmp_path):
    """`python -m moegen` ends the process without the interpreter's teardown: what a command printed
    into a pipe must still arrive whole, and the exit code must be the command's."""
    def program(*args):
        return subprocess.run([sys.executable, "-m", "moegen", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    done = program("generate", olmoe_dir, "--prompt", PROMPTS[1], "--max-new-tokens", 3, "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)  # the whole line, flushed before the exit
    assert record["prompt"] == PROMPTS[1] and len(record["token_ids"]) == 3
    assert "generated tokens" in done.stderr.splitlines()[-1]
    missing = program("serve-offline", tmp_path / "no-model", "--output", tmp_path / "out.jsonl")
    assert missing.returncode == 1
    assert f"{tmp_path / 'no-model'}: no such model directory" in missing.stderr
    assert program("serve-offline", "--no-such-flag").returncode == 2


def test_make_model_then_refuses_to_overwrite(tmp_path):
    out = tmp_path / "olmoe-tiny"
    result = invoke("make-model", out, "--family", "olmoe", "--size", "tiny")
    assert result.exit_code == 0, result.output
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "olmoe"
    weights = sorted(out.glob("*.safetensors"))
    assert weights and disk_shapes(out)
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in disk_shapes(out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = invoke("make-model", out, "--family", "olmoe", "--size", "tiny")
    assert again.exit_code != 0
    assert isinstance(again.exception, SystemExit)  # a clean error, not a crash
    assert "--overwrite" in again.stderr and str(out) in again.stderr
    assert "Traceback" not in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched

    forced = invoke("make-model", out, "--family", "olmoe", "--size", "tiny", "--overwrite", "--seed", "1")
    assert forced.exit_code == 0, forced.output


@pytest.mark.parametrize("engine_args", [
    ["--engine", "reference"],
    ["--engine", "runtime"],
    ["--batch-size", "1", "--attn-micro-batch", "1", "--expert-slots", "1", "--expert-micro-batch", "3"],
    ["--batching", "model", "--gpu-memory", "4MiB", "--sim-link-gbps", "5"],
])
def test_generate_json_matches_transformers(olmoe_dir, engine_args):
    args = ["generate", olmoe_dir]
    for p in PROMPTS:
        args += ["--prompt", p]
    result = invoke(*args, "--max-new-tokens", MAX_NEW, "--json", *engine_args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    records = [json.loads(line) for line in lines]

    model = AutoModelForCausalLM.from_pretrained(str(olmoe_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(olmoe_dir))
    eos = eos_ids(olmoe_dir)
    assert len(eos) == 2
    for i, (prompt, rec) in enumerate(zip(PROMPTS, records)):
        assert set(rec) == {"index", "prompt", "text", "token_ids", "finish_reason"}
        assert rec["index"] == i and rec["prompt"] == prompt
        assert 1 <= len(rec["token_ids"]) <= MAX_NEW
        assert rec["finish_reason"] in {"stop", "length"}
        expected = hf_greedy(model, tokenizer, prompt, MAX_NEW)
        assert rec["token_ids"] == expected, (prompt, rec["token_ids"], expected)
        stopped = expected[-1] in eos
        assert rec["finish_reason"] == ("stop" if stopped else "length")
        if not stopped:
            assert len(expected) == MAX_NEW
        assert rec["text"] == tokenizer.decode(rec["token_ids"], skip_special_tokens=True)
    # The fixture made PROMPTS[0] stop on its third token; PROMPTS[1] runs to the limit unless it hits an EOS.
    assert records[0]["finish_reason"] == "stop" and len(records[0]["token_ids"]) <= 3


def test_generate_missing_directory_is_a_one_line_error():
    missing = "/does/not/exist"
    assert not Path(missing).exists()
    result = invoke("generate", missing, "--prompt", "x")
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and missing in err[0], result.stderr


def test_generate_rejects_zero_new_tokens(olmoe_dir):
    result = invoke("generate", olmoe_dir, "--prompt", "x", "--max-new-tokens", "0")
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output and result.stdout == ""
    assert "--max-new-tokens" in result.stderr and "0 is not in the range x>=1" in result.stderr


def test_make_model_never_deletes_files_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"precious")
    result = invoke("make-model", out, "--family", "olmoe")
    assert result.exit_code != 0 and "--overwrite" in result.stderr and "not empty" in result.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == b"precious"


def test_zero_new_tokens_fails_before_making_the_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_CACHE", str(tmp_path / "cache"))
    result = invoke("generate", "--prompt", "x", "--max-new-tokens", "0")
    assert result.exit_code != 0 and not (tmp_path / "cache").exists()


def test_make_model_set_overrides_config(tmp_path):
    out = tmp_path / "v2-qlora"
    result = invoke("make-model", out, "--family", "deepseek_v2", "--set", "q_lora_rank=8")
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["q_lora_rank"] == 8 and isinstance(cfg["q_lora_rank"], int)
    shapes = disk_shapes(out)
    H, N = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = N * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])
    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.self_attn."
        assert shapes[prefix + "q_a_proj.weight"] == (8, H)
        assert shapes[prefix + "q_a_layernorm.weight"] == (8,)
        assert shapes[prefix + "q_b_proj.weight"] == (qk, 8)
        assert prefix + "q_proj.weight" not in shapes
    # transformers reads the same checkpoint without missing or unexpected tensors.
    _, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_make_model_fp8(tmp_path):
    assert "--quantization [none|fp8]" in invoke("make-model", "--help").output
    out = tmp_path / "qwen3-fp8"
    result = invoke("make-model", out, "--family", "qwen3_moe", "--quantization", "fp8", "--expert-layout", "fused",
                    "--set", "moe_intermediate_size=128", "--set", "num_experts=16")
    assert result.exit_code == 0, result.output
    assert "FP8 linears" in result.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        stored = {name: (f.get_slice(name).get_dtype(), f.get_slice(name).get_shape()) for name in f.keys()}
    experts = "model.layers.0.mlp.experts."
    assert stored[experts + "gate_up_proj"] == ("F8_E4M3", [16, 256, 64])
    assert stored[experts + "gate_up_proj_scale_inv"] == ("F32", [16, 2, 1])
    assert stored["model.layers.0.mlp.gate.weight"][0] == "BF16"

    refused = invoke("make-model", tmp_path / "refused", "--family", "qwen3_moe", "--quantization", "fp8",
                     "--expert-layout", "fused")
    assert refused.exit_code == 1 and "--set moe_intermediate_size=128" in refused.stderr
    assert "Traceback" not in refused.output and not (tmp_path / "refused").exists()
    assert invoke("make-model", tmp_path / "int4", "--family", "olmoe", "--quantization", "int4").exit_code == 2


def test_generate_without_model_dir_makes_the_demo(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOEGEN_CACHE", str(cache))
    start = time.perf_counter()
    result = invoke("generate", "--prompt", "hi", "--max-new-tokens", "2")
    first_s = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    demos = [p for p in cache.iterdir() if p.name != "calibration"]  # the planner's cache sits beside it
    assert len(demos) == 1 and demos[0].name.startswith("demo-")  # no scratch directory left behind
    demo = demos[0]
    assert (demo / "config.json").is_file() and (demo / "tokenizer_config.json").is_file()
    params = sum(int(torch.Size(s).numel()) for s in disk_shapes(demo).values())
    assert 10_000_000 <= params <= 40_000_000  # the 'small' size
    print(f"demo checkpoint made and used in {first_s:.1f}s")

    stamps = {p.name: p.stat().st_mtime_ns for p in demo.iterdir()}
    again = invoke("generate", "--prompt", "hi", "--max-new-tokens", "2", "--json")
    assert again.exit_code == 0, again.output
    assert {p.name: p.stat().st_mtime_ns for p in demo.iterdir()} == stamps  # reused, not remade
    assert "making the demo checkpoint" in result.stderr and "making the demo checkpoint" not in again.stderr
    (record,) = [json.loads(line) for line in again.stdout.splitlines()]

    model = AutoModelForCausalLM.from_pretrained(str(demo), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(demo))
    expected = hf_greedy(model, tokenizer, "hi", 2)
    assert record["token_ids"] == expected
    reason = "length" if len(expected) == 2 and expected[-1] not in eos_ids(demo) else "stop"
    text = tokenizer.decode(expected, skip_special_tokens=True)
    assert result.stdout == f"[0] 'hi' -> {text!r} ({len(expected)} tokens, {reason})\n"


def test_generate_sampling_flags_are_reproducible(olmoe_dir):
    args = ["generate", olmoe_dir, "--prompt", "One", "--prompt", "Two words", "--max-new-tokens", "8", "--json",
            "--temperature", "1.0", "--top-p", "0.9", "--top-k", "40", "--seed", "7", "--ignore-eos"]
    first, again = invoke(*args), invoke(*args, "--batch-size", "1")
    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    ids = [json.loads(line)["token_ids"] for line in first.stdout.splitlines()]
    assert ids == [json.loads(line)["token_ids"] for line in again.stdout.splitlines()]
    assert all(len(t) == 8 for t in ids)  # --ignore-eos: every completion runs to its length
    greedy = invoke("generate", olmoe_dir, "--prompt", "One", "--max-new-tokens", "8", "--json", "--ignore-eos")
    assert json.loads(greedy.stdout.splitlines()[0])["token_ids"] != ids[0]


def test_generate_reports_a_budget_that_cannot_hold_the_core(olmoe_dir):
    result = invoke("generate", olmoe_dir, "--prompt", "x", "--gpu-memory", "10KiB")
    assert result.exit_code != 0 and "--gpu-memory" in result.stderr and "Traceback" not in result.output


def test_device_and_dtype_auto_are_said_at_start(olmoe_dir):
    result = invoke("generate", olmoe_dir, "--prompt", "Hi", "--max-new-tokens", 2, "--no-plan")
    assert result.exit_code == 0, result.output
    err = result.stderr.splitlines()
    visible = torch.cuda.is_available()
    assert err[0] == ("moegen: device cuda (auto: torch sees " + torch.cuda.get_device_name(0) + ")" if visible
                      else "moegen: device cpu (auto: no GPU visible)")
    if not visible:
        assert err[1] == "moegen: dtype float32 (auto: float32 on cpu)"
        assert "runtime engine, cpu, float32)" in err[-1]
    given = invoke("generate", olmoe_dir, "--prompt", "Hi", "--max-new-tokens", 2, "--no-plan", "--device", "cpu",
                   "--dtype", "float32")
    assert given.exit_code == 0 and "auto" not in given.stderr


def test_on_a_gpu_machine_auto_takes_cuda_and_the_checkpoints_dtype(olmoe_dir, monkeypatch):
    """What torch sees is patched to one GPU; the reference engine runs on the host whatever the device,
    so the choice shows without a GPU here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    named = json.loads((olmoe_dir / "config.json").read_text())["torch_dtype"]
    assert named == "bfloat16"
    result = invoke("generate", olmoe_dir, "--prompt", "Hi", "--max-new-tokens", 2, "--engine", "reference")
    assert result.exit_code == 0, result.output
    err = result.stderr.splitlines()
    assert err[:2] == ["moegen: device cuda (auto: torch sees NVIDIA H200)",
                       "moegen: dtype bfloat16 (auto: the checkpoint's dtype)"]
    assert "reference engine, cuda, bfloat16)" in err[-1]
    linked = invoke("generate", olmoe_dir, "--prompt", "Hi", "--max-new-tokens", 2, "--engine", "reference",
                    "--sim-link-gbps", "4")
    assert linked.exit_code == 0, linked.output
    assert linked.stderr.splitlines()[:2] == [
        "moegen: device cpu (auto: --sim-link-gbps simulates a link on the cpu backend)",
        "moegen: dtype float32 (auto: float32 on cpu)"]


# Names written out by hand from the released GLM-4.5 and MiniMax-M2 checkpoints (layer 3 is GLM's first MoE layer).
REAL_NAMES = {
    "glm4_moe": ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.self_attn.q_proj.bias",
                 "model.layers.3.mlp.gate.weight", "model.layers.3.mlp.gate.e_score_correction_bias",
                 "model.layers.3.mlp.experts.159.down_proj.weight", "model.layers.3.mlp.shared_experts.up_proj.weight",
                 "model.layers.5.eh_proj.weight", "model.layers.5.enorm.weight"],
    "minimax_m2": ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.e_score_correction_bias",
                   "model.layers.0.block_sparse_moe.experts.255.w3.weight", "model.layers.0.self_attn.q_norm.weight"],
}


@pytest.mark.parametrize("family", sorted(REAL_NAMES))
def test_make_model_writes_the_newer_families_in_their_real_format(tmp_path, family):
    out = tmp_path / family
    result = invoke("make-model", out, "--family", family)
    assert result.exit_code == 0, result.output
    shapes = disk_shapes(out)
    assert set(REAL_NAMES[family]) <= set(shapes)
    assert not any(".o_proj.bias" in n for n in shapes)  # GLM: attention_bias is q/k/v only; MiniMax: none
    cfg = json.loads((out / "config.json").read_text())
    if family == "minimax_m2":  # released spelling of partial rotary; its q/k norms span all heads
        assert cfg["rotary_dim"] == cfg["head_dim"] // 2 and "partial_rotary_factor" not in cfg
        assert shapes["model.layers.0.self_attn.q_norm.weight"] == (cfg["num_attention_heads"] * cfg["head_dim"],)
    _, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    past_end = f"model.layers.{cfg['num_hidden_layers']}."  # GLM's multi-token-prediction layer, which transformers skips
    assert all(k.startswith(past_end) for k in info["unexpected_keys"])
