"""The runtime on FP8 block-scaled checkpoints: greedy tokens equal transformers' with every module resident
and with every one streamed, and what the host holds and the link carries is, byte for byte, the FP8
elements and block scales of the quantized linears and the run dtype for the rest, counted from the files."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from fp8_oracle import FP8_PARITY, IDS
from test_runtime_parity import PROMPTS, assert_parity, new_tokens, transformers_runs

from moegen.models.hf_config import generation_eos_ids, load_model_config
from moegen.models.loader import load_checkpoint
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.engine import Engine
from moegen.runtime.requests import Request
from moegen.runtime.residency import ModuleId

CORE = re.compile(r"(input_layernorm|post_attention_layernorm|mlp\.gate\.weight|e_score_correction_bias)$")


@pytest.fixture(scope="module")
def fp8_oracle(tiny_checkpoint):
    """(family, layout) -> (FP8 checkpoint, transformers' greedy ids and logits per prompt)."""
    cache = {}

    def get(family, layout):
        if (family, layout) not in cache:
            overrides = dict(FP8_PARITY)[family]
            path = tiny_checkpoint(family, layout, quantization="fp8", **overrides)
            # transformers on a cpu leaves a fused file's scales unread: its oracle is the per-expert file,
            # which holds the same FP8 bytes (tests/models/test_fp8_parity.py)
            oracle_path = tiny_checkpoint(family, "per-expert", quantization="fp8", **overrides)
            cache[family, layout] = (path, transformers_runs(oracle_path))
        return cache[family, layout]

    return get


def run(path, **knobs):
    cfg, weights, _ = load_checkpoint(path)
    with Engine(cfg, weights, RuntimeConfig(max_seq_len=64, batch_size=4, **knobs), generation_eos_ids(path, cfg)) as e:
        results = {r.id: r for r in e.generate([Request(p, new_tokens(i)) for i, p in enumerate(PROMPTS)])}
        return results, e


def streams_everything(path, **knobs) -> RuntimeConfig:
    """Knobs under which no module stays resident: the smallest device budget that holds the core, KV staging,
    activations and two slots of each module kind, found with the runtime's own sizing rules (`setting`), on
    a fast simulated link."""
    from moegen.planner.cost import ModelFacts, setting

    cfg, weights, _ = load_checkpoint(path)
    facts = ModelFacts.of(cfg, weights, torch.float32)
    rcfg = RuntimeConfig(max_seq_len=64, batch_size=4, expert_slots=2, sim_link_gbps=100.0, gpu_memory=2**40, **knobs)
    budget = setting(facts, rcfg, None, 2**40).device_bytes
    for _ in range(8):  # a smaller budget holds a smaller workspace: shrink until nothing is left for residents
        s = setting(facts, dataclasses.replace(rcfg, gpu_memory=budget), None, budget)
        resident = sum(facts.sizes[m].resident for m in s.residency.resident)
        if not resident:
            return dataclasses.replace(rcfg, gpu_memory=budget)
        budget -= resident
    raise AssertionError(f"{path}: modules stay resident under every budget tried")


def run_with(path, rcfg: RuntimeConfig):
    cfg, weights, _ = load_checkpoint(path)
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg)) as e:
        results = {r.id: r for r in e.generate([Request(p, new_tokens(i)) for i, p in enumerate(PROMPTS)])}
        return results, e


@pytest.mark.parametrize("placement", ["resident", "streamed"])
@pytest.mark.parametrize("layout", ["per-expert", "fused"])
@pytest.mark.parametrize("family", IDS)
def test_fp8_runtime_matches_transformers(family, layout, placement, fp8_oracle):
    path, oracle = fp8_oracle(family, layout)
    results, engine = run(path) if placement == "resident" else run_with(path, streams_everything(path))
    if placement == "streamed":
        assert not engine.runtime.placement.resident_modules, "the budget was meant to stream every module"
        assert engine.backend.counters.h2d_weight_bytes > 0
    assert_parity(results, oracle)


def hand_bytes(path: Path) -> dict[ModuleId, int]:
    """Each streamable module's bytes from the files' own dtypes and shapes: F8_E4M3 1 a weight, its F32 scales
    4 a block, the rest in the run dtype (float32: 4)."""
    out: Counter[ModuleId] = Counter()
    num_layers = load_model_config(path).num_layers
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                m = re.match(r"model\.layers\.(\d+)\.(self_attn|mlp\.experts\.(\d+)|mlp\.shared_experts|mlp)\.", name)
                if m is None or CORE.search(name):
                    continue  # embedding, final norm, lm_head, norms and routers live on the device (the core)
                layer, what = int(m.group(1)), m.group(2)
                if layer >= num_layers:
                    continue  # a multi-token-prediction layer, skipped as transformers skips it
                module = (ModuleId("attn", layer) if what == "self_attn" else
                          ModuleId("expert", layer, int(m.group(3))) if m.group(3) else ModuleId("mlp", layer))
                t = f.get_slice(name)
                numel = torch.Size(t.get_shape()).numel()
                out[module] += numel * (1 if t.get_dtype() == "F8_E4M3" else 4)
    return out


def test_host_and_link_carry_fp8_as_stored(tiny_checkpoint):
    path = tiny_checkpoint("deepseek_v3", quantization="fp8", **dict(FP8_PARITY)["deepseek_v3"])
    expected = hand_bytes(path)
    assert {m.kind for m in expected} == {"attn", "mlp", "expert"}
    results, engine = run_with(path, streams_everything(path, resident_experts=0))
    placement, counters = engine.runtime.placement, engine.backend.counters
    assert {m: b.nbytes for m, b in placement.blocks.items()} == dict(expected)
    assert all(placement.streamed(m) for m in placement.blocks if m.kind == "expert")
    copied = sum(n * expected[m] for m, n in placement.fills.items())
    assert counters.h2d_weight_bytes == copied > 0
    streamed = sum(expected[m] for m in placement.blocks if placement.streamed(m))
    steps = engine.stats.steps
    assert counters.h2d_weight_bytes <= steps * streamed  # at most every streamed module, once a step


def test_a_second_engine_finds_the_weights_fp8(tiny_checkpoint):
    """An engine that keeps everything resident dequantizes its copies, not the loaded weights: the next
    engine on the same weights (the planner's in-run profiling, then the run) streams FP8 again."""
    path = tiny_checkpoint("deepseek_v3", quantization="fp8", **dict(FP8_PARITY)["deepseek_v3"])
    cfg, weights, _ = load_checkpoint(path)
    eos = generation_eos_ids(path, cfg)
    with Engine(cfg, weights, RuntimeConfig(max_seq_len=64), eos) as first:
        list(first.generate([Request(PROMPTS[0], 2)]))
    with Engine(cfg, weights, RuntimeConfig(max_seq_len=64, gpu_memory=2**40, resident_experts=0), eos) as second:
        list(second.generate([Request(PROMPTS[0], 2)]))
        blocks = second.runtime.placement.blocks
    assert {m: b.nbytes for m, b in blocks.items()} == dict(hand_bytes(path))


def test_the_plan_says_which_residents_are_dequantized_and_what_it_costs(tiny_checkpoint):
    from moegen.planner.cost import ModelFacts, setting

    path = tiny_checkpoint("deepseek_v3", quantization="fp8", **dict(FP8_PARITY)["deepseek_v3"])
    cfg, weights, _ = load_checkpoint(path)
    s = setting(ModelFacts.of(cfg, weights, torch.float32), RuntimeConfig(max_seq_len=64, sim_link_gbps=1.0), None, None)
    extra, layers = 0, cfg.num_layers
    for file in sorted(path.glob("*.safetensors")):  # float32 (4 bytes) in place of 1 a weight and 4 a block
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                layer = re.match(r"model\.layers\.(\d+)\.", name)
                if layer and int(layer.group(1)) < layers and f.get_slice(name).get_dtype() == "F8_E4M3":
                    scale = torch.Size(f.get_slice(name + "_scale_inv").get_shape()).numel()
                    extra += 3 * torch.Size(f.get_slice(name).get_shape()).numel() - 4 * scale
    assert s.fp8_residents == (len(s.residency.resident), extra) and extra > 0
