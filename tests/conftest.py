"""Shared fixtures: tiny random checkpoints, made once per test session."""

from __future__ import annotations

import json
import os

import pytest
import torch

from moegen.checkpoints.make import make_model
from moegen.runtime.cpu_threads import LANES_ENV

# Tiny models: one intra-op thread is fastest, and immune to a busy second core.
torch.set_num_threads(1)
# ... but keep the cpu compute stream's lanes, which a user's 2-core run gets by default (one
# intra-op thread alone would turn them off): every engine test runs expert launches side by side.
os.environ.setdefault(LANES_ENV, "2")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """make(family, layout="per-expert", quantization="none", **config_overrides) -> directory of a tiny
    checkpoint (cached)."""
    made = {}

    def make(family: str, layout: str = "per-expert", quantization: str = "none", **overrides):
        key = (family, layout, quantization, json.dumps(overrides, sort_keys=True))  # overrides may hold dicts (rope_parameters)
        if key not in made:
            quantized = [] if quantization == "none" else [quantization]
            name = "-".join([family, layout, *quantized] + [f"{k}={v}" for k, v in sorted(overrides.items())])
            out = tmp_path_factory.mktemp(name.replace("/", "_"))
            made[key] = make_model(out, family, "tiny", seed=1, expert_layout=layout, overrides=overrides or None,
                                   overwrite=True, quantization=quantization).path
        return made[key]

    return make


@pytest.fixture
def attention_split(monkeypatch):
    """Every decode micro-batch of two or more sequences attends as two launches on the cpu lanes; yields the
    number of launches each staged micro-batch's attention was cut into, as the run goes."""
    from moegen.runtime.tasks import attention

    monkeypatch.setenv(LANES_ENV, "2")
    monkeypatch.setattr(attention, "LANE_SEQUENCES", 1)
    split: list[int] = []
    lane_parts = attention.lane_parts

    def spy(mb, lanes):
        parts = lane_parts(mb, lanes)
        split.append(len(parts))
        return parts

    monkeypatch.setattr(attention, "lane_parts", spy)
    return split
