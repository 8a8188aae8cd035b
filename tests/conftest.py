"""Shared fixtures: tiny random checkpoints, made once per test session."""

from __future__ import annotations

import pytest
import torch

from moegen.checkpoints.make import make_model

# Tiny models: one intra-op thread is fastest, and immune to a busy second core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """make(family, layout="per-expert", **config_overrides) -> directory of a tiny checkpoint (cached)."""
    made = {}

    def make(family: str, layout: str = "per-expert", **overrides):
        key = (family, layout, tuple(sorted(overrides.items())))
        if key not in made:
            name = "-".join([family, layout] + [f"{k}={v}" for k, v in sorted(overrides.items())])
            out = tmp_path_factory.mktemp(name.replace("/", "_"))
            made[key] = make_model(out, family, "tiny", seed=1, expert_layout=layout, overrides=overrides or None,
                                   overwrite=True).path
        return made[key]

    return make
