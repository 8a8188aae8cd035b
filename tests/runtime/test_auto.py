"""`--device auto` and `--dtype auto`: the rules, with torch's view of the GPU patched, and the dtype
each checkpoint's config.json names re-read from disk."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moegen.models.loader import load_checkpoint
from moegen.runtime.auto import resolve_device, resolve_dtype
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.engine import Engine
from moegen.runtime.requests import Request


@pytest.fixture
def gpu(monkeypatch):
    """torch sees one NVIDIA H200 (nothing here touches it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")


def test_device_auto_is_cuda_where_torch_sees_a_gpu_and_no_link_is_simulated(gpu):
    said = []
    assert resolve_device("auto", None, said.append) == "cuda"
    assert resolve_device("auto", 4.0, said.append) == "cpu"
    assert said == ["device cuda (auto: torch sees NVIDIA H200)",
                    "device cpu (auto: --sim-link-gbps simulates a link on the cpu backend)"]
    assert RuntimeConfig().device == "cuda" and RuntimeConfig(device="auto").device == "cuda"
    assert RuntimeConfig(sim_link_gbps=4.0).device == "cpu"
    assert RuntimeConfig(device="cpu").device == "cpu"


def test_device_auto_is_cpu_where_no_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    said = []
    assert resolve_device("auto", None, said.append) == "cpu" and said == ["device cpu (auto: no GPU visible)"]
    assert RuntimeConfig().device == "cpu"
    assert resolve_device("cuda", None, said.append) == "cuda" and len(said) == 1  # given: kept, nothing said
    with pytest.raises(ValueError, match="--sim-link-gbps"):
        RuntimeConfig(device="cuda", sim_link_gbps=4.0)
    with pytest.raises(ValueError, match="--device must be auto, cpu or cuda"):
        RuntimeConfig(device="tpu")


def with_config(src, dst, **fields):
    """A copy of checkpoint `src` whose config.json has `fields` changed (None: removed)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in fields.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_dtype_auto_is_the_checkpoints_on_cuda_and_float32_on_cpu(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("mixtral")
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    said = []
    cpu, cuda = RuntimeConfig(device="cpu", dtype="auto"), RuntimeConfig(device="cuda", dtype="auto")
    assert resolve_dtype(cpu, path, say=said.append).dtype == "float32"
    assert resolve_dtype(cuda, path, say=said.append).dtype == "bfloat16"
    assert said == ["dtype float32 (auto: float32 on cpu)", "dtype bfloat16 (auto: the checkpoint's dtype)"]
    half = with_config(path, tmp_path / "half", torch_dtype=None, dtype="float16")  # transformers 5 writes `dtype`
    assert resolve_dtype(cuda, half).dtype == "float16"
    fp8 = with_config(path, tmp_path / "fp8", torch_dtype="float8_e4m3fn")
    said.clear()
    assert resolve_dtype(cuda, fp8, say=said.append).dtype == "bfloat16"
    assert f"{fp8}/config.json names dtype float8_e4m3fn" in said[0] and "--dtype" in said[0]
    none = with_config(path, tmp_path / "none", torch_dtype=None)
    assert resolve_dtype(cuda, none, say=said.append).dtype == "bfloat16" and "names no dtype" in said[1]
    given = RuntimeConfig(device="cuda", dtype="float16")
    assert resolve_dtype(given, path, say=said.append) is given and len(said) == 2  # given: kept, nothing said
    with pytest.raises(ValueError, match="resolve_dtype"):
        RuntimeConfig(dtype="auto").torch_dtype


def test_engine_decides_auto_for_api_users(tiny_checkpoint):
    """RuntimeConfig(device="auto", dtype="auto") handed to an Engine with weights already loaded: the
    device by the rule (no GPU here), the dtype the weights'."""
    path = tiny_checkpoint("mixtral")
    cfg, weights, _ = load_checkpoint(path, torch.bfloat16)
    with Engine(cfg, weights, RuntimeConfig(device="auto", dtype="auto", max_seq_len=16), ()) as engine:
        assert (engine.rcfg.device, engine.rcfg.dtype) == ("cpu" if not torch.cuda.is_available() else "cuda",
                                                           "bfloat16")
    with Engine.from_model_dir(path, RuntimeConfig(device="cpu", dtype="auto", max_seq_len=16)) as engine:
        assert engine.rcfg.dtype == "float32"  # loaded in it: torch_dtype refuses "auto"
        (result,) = engine.generate([Request([1, 5, 9], 2, ignore_eos=True)])
        assert len(result.token_ids) == 2
