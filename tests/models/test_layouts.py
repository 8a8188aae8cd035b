"""Expert layouts and the on-disk format of made checkpoints, against the files and transformers' own saves."""

from __future__ import annotations

import pytest
import torch
from checkpoint_files import FAMILIES, MTP_FAMILIES, config_of, disk_shapes, disk_tensor, mtp_prefix
from safetensors import safe_open

from moegen.models.loader import load_checkpoint


# ----------------------------------------------------------------------------------------------
# Expert layouts: transformers' fused conversion of a per-expert checkpoint loads to the same weights.

PER_EXPERT_NAMES = {  # gate, up, down of expert {e} in layer {l}, written out by hand from the HF checkpoints
    "qwen3_moe": ("model.layers.{l}.mlp.experts.{e}.gate_proj.weight", "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
                  "model.layers.{l}.mlp.experts.{e}.down_proj.weight", "model.layers.{l}.mlp.gate.weight"),
    "mixtral": ("model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",
                "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",
                "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight", "model.layers.{l}.block_sparse_moe.gate.weight"),
    "minimax_m2": ("model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",
                   "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",
                   "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight",
                   "model.layers.{l}.block_sparse_moe.gate.weight"),
}
# The router's score-correction bias per layout, as MiniMax-M2's checkpoints and transformers' fused save name it.
CORRECTION_BIAS_NAMES = {"minimax_m2": ("model.layers.{l}.block_sparse_moe.e_score_correction_bias",
                                        "model.layers.{l}.mlp.e_score_correction_bias")}


def test_minimax_router_bias_moves_with_the_layout(made, hf):
    per_expert_dir, fused_dir = made("minimax_m2").path, hf("minimax_m2")["fused"]  # fused: written by transformers
    ours_fused = made("minimax_m2", "fused").path
    per_expert_name, fused_name = CORRECTION_BIAS_NAMES["minimax_m2"]
    _, wp, _ = load_checkpoint(per_expert_dir)
    _, wf, _ = load_checkpoint(fused_dir)
    for l, (lp, lf) in enumerate(zip(wp.layers, wf.layers)):
        on_disk = disk_tensor(per_expert_dir, per_expert_name.format(l=l))
        assert on_disk.dtype == torch.float32  # as the real checkpoints keep it
        assert torch.equal(disk_tensor(fused_dir, fused_name.format(l=l)), on_disk)
        assert torch.equal(disk_tensor(ours_fused, fused_name.format(l=l)), on_disk)  # one seed, one model
        assert torch.equal(lp.moe.router.e_score_correction_bias, on_disk)
        assert torch.equal(lf.moe.router.e_score_correction_bias, on_disk)


@pytest.mark.parametrize("family", sorted(PER_EXPERT_NAMES))
def test_fused_and_per_expert_layouts_load_equal(made, hf, family):
    per_expert_dir = made(family).path
    fused_dir = hf(family)["fused"]  # written by transformers from the per-expert checkpoint
    fused_shapes = disk_shapes(fused_dir)
    assert any(n.endswith(".mlp.experts.gate_up_proj") for n in fused_shapes)
    assert not any(".experts.0." in n for n in fused_shapes)
    cfg = config_of(per_expert_dir)
    num_experts = cfg.get("num_experts") or cfg["num_local_experts"]

    _, wp, rp = load_checkpoint(per_expert_dir)
    _, wf, rf = load_checkpoint(fused_dir)
    assert (rp.expert_layout, rf.expert_layout) == ("per-expert", "fused")
    gate_t, up_t, down_t, router_t = PER_EXPERT_NAMES[family]
    moe_layers = [l for l, lw in enumerate(wp.layers) if lw.moe is not None]
    assert moe_layers == list(range(cfg["num_hidden_layers"]))
    for l in moe_layers:
        ep, ef = wp.layers[l].moe.experts, wf.layers[l].moe.experts
        assert len(ep) == len(ef) == num_experts
        router = disk_tensor(per_expert_dir, router_t.format(l=l)).float()
        assert torch.equal(wp.layers[l].moe.router.gate, router) and torch.equal(wf.layers[l].moe.router.gate, router)
        for e in range(num_experts):
            for field, template in (("gate_proj", gate_t), ("up_proj", up_t), ("down_proj", down_t)):
                on_disk = disk_tensor(per_expert_dir, template.format(l=l, e=e)).float()
                assert torch.equal(getattr(ep[e], field), on_disk), (l, e, field)
                assert torch.equal(getattr(ef[e], field), on_disk), (l, e, field)


# ----------------------------------------------------------------------------------------------
# On-disk format: transformers loads every family without missing keys and saves the same names.


@pytest.mark.parametrize("family", FAMILIES)
def test_on_disk_format_matches_transformers(made, hf, family):
    saved = hf(family)
    info = saved["info"]
    assert not info["missing_keys"], sorted(info["missing_keys"])[:10]
    assert not info["mismatched_keys"], sorted(info["mismatched_keys"])[:10]
    assert not info.get("error_msgs")
    prefix = mtp_prefix(saved["src"])
    if family in MTP_FAMILIES:  # the multi-token-prediction layer, which transformers doesn't build
        assert info["unexpected_keys"] and all(k.startswith(prefix) for k in info["unexpected_keys"])
    else:
        assert not info["unexpected_keys"], sorted(info["unexpected_keys"])[:10]
    assert not saved["tied"] and not config_of(saved["src"])["tie_word_embeddings"]  # so lm_head is stored by both

    def ours(path):
        return {n: s for n, s in disk_shapes(path).items() if not n.startswith(prefix)}

    ours_per_expert, ours_fused = made(family).path, made(family, "fused").path
    theirs_default, theirs_fused = disk_shapes(saved["default"]), disk_shapes(saved["fused"])
    assert theirs_fused == ours(ours_fused)
    assert theirs_default == ours(ours_per_expert)
    if family in MTP_FAMILIES:  # what we keep beyond transformers is exactly the MTP layer
        assert set(disk_shapes(ours_per_expert)) - set(theirs_default) == {n for n in disk_shapes(ours_per_expert)
                                                                            if n.startswith(prefix)}


# ----------------------------------------------------------------------------------------------
# Sizes.


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_parameter_count(made, family):
    m = made(family)
    counted = 0
    for path in sorted(m.path.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                counted += int(torch.Size(shape).numel())
    assert 0 < counted < 2_000_000
    assert m.parameters == counted
    assert m.bytes_on_disk == sum(p.stat().st_size for p in m.path.glob("*.safetensors"))


@pytest.mark.parametrize("family", sorted(PER_EXPERT_NAMES))
def test_one_seed_gives_one_model_in_either_layout(made, family):
    """make_model's fused checkpoint stacks exactly the per-expert tensors of the same seed (read from disk)."""
    per_expert_dir, fused_dir = made(family).path, made(family, "fused").path
    cfg = config_of(per_expert_dir)
    num_experts = cfg.get("num_experts") or cfg["num_local_experts"]
    gate_t, up_t, down_t, router_t = PER_EXPERT_NAMES[family]
    for l in range(cfg["num_hidden_layers"]):
        gate_up = disk_tensor(fused_dir, f"model.layers.{l}.mlp.experts.gate_up_proj")
        down = disk_tensor(fused_dir, f"model.layers.{l}.mlp.experts.down_proj")
        assert torch.equal(disk_tensor(fused_dir, f"model.layers.{l}.mlp.gate.weight"),
                           disk_tensor(per_expert_dir, router_t.format(l=l)))
        for e in range(num_experts):
            gate, up = disk_tensor(per_expert_dir, gate_t.format(l=l, e=e)), disk_tensor(per_expert_dir, up_t.format(l=l, e=e))
            assert torch.equal(gate_up[e], torch.cat([gate, up])), (l, e)
            assert torch.equal(down[e], disk_tensor(per_expert_dir, down_t.format(l=l, e=e))), (l, e)
