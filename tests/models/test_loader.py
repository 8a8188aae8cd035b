"""Tests for moegen.models.loader against files re-read from disk and against transformers.

Oracles: the safetensors files themselves (read back with `safe_open` / `load_file`), config.json
re-read as JSON, and transformers (`from_pretrained` with `output_loading_info=True`, and the two
`save_pretrained` formats). Checkpoints are made once per module and copied before corrupting.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything must load from the written directory alone

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from moegen.checkpoints.make import make_model  # noqa: E402
from moegen.config import ConfigError  # noqa: E402
from moegen.models.loader import CheckpointError, load_checkpoint  # noqa: E402

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "minimax_m2")
MTP_FAMILIES = ("deepseek_v3", "glm4_moe")  # real checkpoints store multi-token-prediction layers past the last one
ERROR_FAMILY = "olmoe"  # the checkpoint the error cases corrupt


# ----------------------------------------------------------------------------------------------
# Helpers: everything here reads the files directly, never through moegen.


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


# ----------------------------------------------------------------------------------------------
# Fixtures: checkpoints made once per module.


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


# ----------------------------------------------------------------------------------------------
# Error cases: exception type and a message naming the offending thing.


def test_missing_expert_tensor(corrupt):
    name = "model.layers.1.mlp.experts.7.up_proj.weight"
    rewrite_single_file(corrupt, lambda t: t.pop(name))
    assert name not in disk_shapes(corrupt)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert repr(name) in msg and "missing" in msg
    cfg = config_of(corrupt)
    assert str([cfg["intermediate_size"], cfg["hidden_size"]]) in msg  # the shape it expected


def test_misshaped_tensor_names_both_shapes(corrupt):
    cfg = config_of(corrupt)
    H, I = cfg["hidden_size"], cfg["intermediate_size"]  # OLMoE: intermediate_size is one expert's width
    name = "model.layers.0.mlp.experts.5.down_proj.weight"
    assert disk_shapes(corrupt)[name] == (H, I)
    rewrite_single_file(corrupt, lambda t: t.__setitem__(name, torch.zeros(H, I + 3, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert repr(name) in msg
    assert str([H, I + 3]) in msg and str([H, I]) in msg


@pytest.mark.parametrize("extra", ["expert past num_experts", "layer past num_hidden_layers"])
def test_unexpected_tensor_is_named(corrupt, extra):
    cfg = config_of(corrupt)
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    if extra == "expert past num_experts":
        name, shape = f"model.layers.0.mlp.experts.{cfg['num_experts']}.gate_proj.weight", (I, H)
    else:  # only DeepSeek-V3 stores (and skips) layers past the end
        name, shape = f"model.layers.{cfg['num_hidden_layers']}.input_layernorm.weight", (H,)
        # transformers agrees that it is not part of the model.
        rewrite_single_file(corrupt, lambda t: t.__setitem__(name, torch.ones(shape, dtype=torch.bfloat16)))
        _, info = AutoModelForCausalLM.from_pretrained(str(corrupt), dtype=torch.float32, output_loading_info=True)
        assert name in info["unexpected_keys"]
    rewrite_single_file(corrupt, lambda t: t.__setitem__(name, torch.ones(shape, dtype=torch.bfloat16)))
    assert name in disk_shapes(corrupt)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert repr(name) in msg and "unexpected" in msg and "model.safetensors" in msg


# GLM-4-MoE and MiniMax-M2 names: (family, layout, make_model kwargs, tensor, its expected shape from config.json).
MISSING = {
    "minimax_m2 router bias": ("minimax_m2", "per-expert", {}, "model.layers.1.block_sparse_moe.e_score_correction_bias",
                               lambda c: [c["num_local_experts"]]),
    "minimax_m2 fused router bias": ("minimax_m2", "fused", {}, "model.layers.0.mlp.e_score_correction_bias",
                                     lambda c: [c["num_local_experts"]]),
    "minimax_m2 whole-projection k_norm": ("minimax_m2", "per-expert", {}, "model.layers.0.self_attn.k_norm.weight",
                                           lambda c: [c["num_key_value_heads"] * c["head_dim"]]),
    "glm4_moe router bias": ("glm4_moe", "per-expert", {}, "model.layers.4.mlp.gate.e_score_correction_bias",
                             lambda c: [c["n_routed_experts"]]),
    "glm4_moe shared expert": ("glm4_moe", "per-expert", {}, "model.layers.3.mlp.shared_experts.down_proj.weight",
                               lambda c: [c["hidden_size"], c["moe_intermediate_size"] * c["n_shared_experts"]]),
    "glm4_moe dense layer": ("glm4_moe", "per-expert", {}, "model.layers.2.mlp.up_proj.weight",
                             lambda c: [c["intermediate_size"], c["hidden_size"]]),
    "glm4_moe per-head k_norm": ("glm4_moe", "per-expert", {"overrides": {"use_qk_norm": True}},
                                 "model.layers.1.self_attn.k_norm.weight", lambda c: [c["head_dim"]]),
    "glm4_moe q bias": ("glm4_moe", "per-expert", {}, "model.layers.0.self_attn.q_proj.bias",
                        lambda c: [c["num_attention_heads"] * c["head_dim"]]),
}


@pytest.mark.parametrize("case", sorted(MISSING))
def test_missing_tensor_of_the_newer_families_is_named(private_copy, case):
    family, layout, kwargs, name, shape = MISSING[case]
    path = private_copy(family, layout, **kwargs)
    assert name in disk_shapes(path)
    rewrite_single_file(path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert repr(name) in msg and "missing" in msg and str(shape(config_of(path))) in msg


@pytest.mark.parametrize("family, name", [
    ("glm4_moe", "model.layers.0.self_attn.o_proj.bias"),  # attention_bias gives q/k/v a bias, never o_proj
    ("glm4_moe", "model.layers.0.self_attn.q_norm.weight"),  # use_qk_norm is false in GLM-4.5's config
    ("glm4_moe", "model.layers.0.mlp.gate.weight"),  # a dense layer (first_k_dense_replace) has no router
    ("minimax_m2", "model.layers.0.mlp.gate.e_score_correction_bias"),  # the bias is the block's, not the router's
])
def test_unexpected_tensor_of_the_newer_families_is_named(private_copy, family, name):
    path = private_copy(family)
    shape = (config_of(path)["hidden_size"],)
    rewrite_single_file(path, lambda t: t.__setitem__(name, torch.ones(shape, dtype=torch.bfloat16)))
    _, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, output_loading_info=True)
    assert name in info["unexpected_keys"]  # transformers agrees it is no part of the model
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert repr(name) in msg and "unexpected" in msg


def test_rotary_inv_freq_is_skipped_like_transformers(corrupt):
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite_single_file(corrupt, lambda t: t.__setitem__(name, torch.ones(8)))
    _, info = AutoModelForCausalLM.from_pretrained(str(corrupt), dtype=torch.float32, output_loading_info=True)
    assert name not in info["unexpected_keys"] and not info["missing_keys"]  # transformers ignores it silently
    _, _, report = load_checkpoint(corrupt)
    assert report.skipped == [name]
    assert name not in report.loaded


def test_unsupported_architecture(corrupt):
    cfg = config_of(corrupt) | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    (corrupt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert "'llama'" in msg and "LlamaForCausalLM" in msg
    assert "config.json" in msg
    assert "mixtral" in msg  # lists what is supported


def test_pickle_only_directory(corrupt):
    tensors = load_file(str(corrupt / "model.safetensors"))
    (corrupt / "model.safetensors").unlink()
    torch.save(tensors, corrupt / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert "pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg


def test_index_lists_a_missing_shard(made, tmp_path):
    src = made(ERROR_FAMILY, max_shard_bytes=200_000).path
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    gone = shards[1]
    (dst / gone).unlink()
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(dst)
    msg = str(exc.value)
    assert gone in msg and "model.safetensors.index.json" in msg
    assert not any(s in msg for s in shards if s != gone)  # names only the missing one


@pytest.mark.parametrize("index_text", ["[1]", '{"weight_map": ["a"]}', '{"weight_map": {"x": 3}}', "{"])
def test_malformed_index_is_a_checkpoint_error(made, tmp_path, index_text):
    dst = tmp_path / "sharded"
    shutil.copytree(made(ERROR_FAMILY, max_shard_bytes=200_000).path, dst)
    (dst / "model.safetensors.index.json").write_text(index_text)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a safetensors index"):
        load_checkpoint(dst)


@pytest.mark.parametrize("text", ["[]", "3", '"olmoe"'])
def test_config_json_that_is_not_an_object(corrupt, text):
    (corrupt / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_checkpoint(corrupt)


def test_invalid_config_json(corrupt):
    (corrupt / "config.json").write_text('{"model_type": "olmoe", "hidden_size": 64,')  # truncated
    with pytest.raises(ConfigError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert str(corrupt / "config.json") in msg and "JSON" in msg


def test_missing_config_json(corrupt):
    (corrupt / "config.json").unlink()
    with pytest.raises(ConfigError) as exc:
        load_checkpoint(corrupt)
    msg = str(exc.value)
    assert str(corrupt / "config.json") in msg and "not found" in msg


# ----------------------------------------------------------------------------------------------
# Sharded checkpoints.


def test_sharded_equals_single_file(made):
    single = made(ERROR_FAMILY).path
    sharded = made(ERROR_FAMILY, max_shard_bytes=200_000).path
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_files = sorted(sharded.glob("*.safetensors"))
    assert len(shard_files) >= 3 and not (sharded / "model.safetensors").exists()
    assert {p.name for p in shard_files} == set(index["weight_map"].values())
    assert set(index["weight_map"]) == set(disk_shapes(sharded)) == set(disk_shapes(single))
    for path in shard_files:  # each shard within the limit (a lone tensor may exceed it; none does here)
        with safe_open(str(path), framework="pt") as f:
            assert sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys()) <= 200_000

    _, w1, r1 = load_checkpoint(single)
    _, ws, rs = load_checkpoint(sharded)
    assert [p.name for p in rs.files] == [p.name for p in shard_files]
    assert rs.loaded == r1.loaded
    pairs = {
        "model.embed_tokens.weight": (w1.embed_tokens, ws.embed_tokens),
        "lm_head.weight": (w1.lm_head, ws.lm_head),
        "model.norm.weight": (w1.norm, ws.norm),
        "model.layers.1.self_attn.k_proj.weight": (w1.layers[1].attn.k_proj, ws.layers[1].attn.k_proj),
        "model.layers.1.mlp.experts.33.down_proj.weight": (w1.layers[1].moe.experts[33].down_proj,
                                                           ws.layers[1].moe.experts[33].down_proj),
        "model.layers.0.mlp.gate.weight": (w1.layers[0].moe.router.gate, ws.layers[0].moe.router.gate),
    }
    for name, (a, b) in pairs.items():
        assert torch.equal(a, b), name
        assert torch.equal(b, disk_tensor(sharded, name).float()), name  # and equal to the file's bytes


# ----------------------------------------------------------------------------------------------
# The load report.


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "glm4_moe"])
def test_report_loaded_is_everything_on_disk(made, family):
    path = made(family).path
    on_disk = set(disk_shapes(path))
    _, _, report = load_checkpoint(path)
    assert report.loaded == on_disk - set(report.skipped)
    assert not report.loaded & set(report.skipped)
    assert report.expert_layout == "per-expert"
    prefix = mtp_prefix(path)
    mtp = {n for n in on_disk if n.startswith(prefix)}
    if family in MTP_FAMILIES:
        assert mtp and {"enorm.weight", "hnorm.weight", "eh_proj.weight"} <= {n[len(prefix):] for n in mtp}
        assert set(report.skipped) == mtp and len(report.skipped) == len(mtp)
        layer = prefix.split(".")[2]
        assert f"skipped {len(mtp)} tensors" in report.note and f"layers {layer}" in report.note
        assert "multi-token-prediction" in report.note
    else:
        assert not mtp
        assert report.skipped == [] and report.note == ""


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
