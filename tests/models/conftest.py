"""The loader tests' checkpoints: made once per test module, and private copies to damage."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything must load from the written directory alone

from checkpoint_files import ERROR_FAMILY  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from moegen.checkpoints.make import make_model  # noqa: E402


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """made(family, layout="per-expert", **kwargs) -> MadeModel, cached for the module."""
    root = tmp_path_factory.mktemp("loader")
    cache = {}

    def get(family: str, layout: str = "per-expert", **kwargs):
        key = (family, layout, json.dumps(kwargs, sort_keys=True))
        if key not in cache:
            out = root / f"{family}-{layout}-{len(cache)}"
            cache[key] = make_model(out, family, "tiny", seed=0, expert_layout=layout, **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def hf(made, tmp_path_factory):
    """hf(family) -> dict: the per-expert checkpoint loaded by transformers, its loading info, and the
    directories transformers' two save formats were written to (cached for the module)."""
    root = tmp_path_factory.mktemp("hf-saved")
    cache = {}

    def get(family: str) -> dict:
        if family not in cache:
            src = made(family).path
            model, info = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, output_loading_info=True)
            fused_dir, default_dir = root / f"{family}-fused", root / f"{family}-default"
            model.save_pretrained(str(fused_dir), save_original_format=False)
            model.save_pretrained(str(default_dir))
            cache[family] = {"src": src, "info": info, "fused": fused_dir, "default": default_dir,
                             "tied": bool(model.config.tie_word_embeddings)}
        return cache[family]

    return get


@pytest.fixture
def private_copy(made, tmp_path):
    """private_copy(family, layout="per-expert", **kwargs) -> a copy of that tiny checkpoint (single file), safe to damage."""

    def copy(family: str, layout: str = "per-expert", **kwargs) -> Path:
        src = made(family, layout, **kwargs).path
        assert (src / "model.safetensors").is_file() and not (src / "model.safetensors.index.json").exists()
        dst = tmp_path / f"ckpt-{family}-{layout}"
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture
def corrupt(private_copy):
    """A private copy of the tiny ERROR_FAMILY checkpoint (single file), safe to damage."""
    return private_copy(ERROR_FAMILY)


