"""What the loader tests read of a checkpoint directory: everything here reads the files directly, never
through moegen."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "minimax_m2")
MTP_FAMILIES = ("deepseek_v3", "glm4_moe")  # real checkpoints store multi-token-prediction layers past the last one
ERROR_FAMILY = "olmoe"  # the checkpoint the error cases corrupt


def disk_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of every tensor in every *.safetensors file of `model_dir`."""
    shapes: dict[str, tuple[int, ...]] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    assert files, f"no safetensors files in {model_dir}"
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                assert name not in shapes, f"{name} stored twice in {model_dir}"
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def disk_tensor(model_dir: Path, name: str) -> torch.Tensor:
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    raise KeyError(f"{name} not in {model_dir}")


def config_of(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def rewrite_single_file(model_dir: Path, edit) -> None:
    """Load model.safetensors, let `edit(dict)` change it, write it back."""
    path = Path(model_dir) / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def mtp_prefix(model_dir: Path) -> str:
    return f"model.layers.{config_of(model_dir)['num_hidden_layers']}."


