"""The model units one by one, each against transformers' own module or a hand-computed value."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig

from moegen.checkpoints.balance import HEAD_TOKENS, calibration_ids
from moegen.checkpoints.make import count_parameters
from moegen.checkpoints.specs import FAMILY_NAMES, PARAM_RANGE, SIZES
from moegen.config import RopeConfig
from moegen.models.hf_config import load_model_config
from moegen.models.batch import AttnBatch
from moegen.models.kv_cache import allocate_kv
from moegen.models.linear import linear, pack_linear, plain
from moegen.models.loader import load_checkpoint
from moegen.models.mla import mla_attention
from moegen.models.moe import route
from moegen.models.reference import ReferenceModel
from moegen.models.rope import Rope, inv_freq
from moegen.models.weights import RouterWeights

ROUTERS = {
    "mixtral": "MixtralTopKRouter",
    "qwen2_moe": "Qwen2MoeTopKRouter",
    "qwen3_moe": "Qwen3MoeTopKRouter",
    "olmoe": "OlmoeTopKRouter",
    "deepseek_v2": "DeepseekV2TopkRouter",
    "deepseek_v3": "DeepseekV3TopkRouter",
    "glm4_moe": "Glm4MoeTopkRouter",
    "minimax_m2": "MiniMaxM2TopKRouter",
}


def hf_class(family: str, name: str):
    return getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_yarn_frequencies_match_transformers(family, tiny_checkpoint):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path = tiny_checkpoint(family)
    hf = AutoConfig.from_pretrained(path)
    want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    rope = load_model_config(path).attention.rope
    assert rope.kind == "yarn"
    torch.testing.assert_close(inv_freq(rope), want_freq, rtol=1e-6, atol=0)
    assert rope.attention_factor == pytest.approx(want_factor)


def test_default_rope_by_hand():
    cfg = RopeConfig(dim=4, theta=100.0, kind="default", interleaved=False)
    torch.testing.assert_close(inv_freq(cfg), torch.tensor([1.0, 0.1]))
    rope = Rope(cfg)
    cos, sin = rope.cos_sin(torch.tensor([1]))
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])  # [T=1, N=1, R=4]: pairs (1,3) and (2,4) rotate
    c0, c1, s0, s1 = cos[0, 0], cos[0, 1], sin[0, 0], sin[0, 1]
    want = torch.tensor([[[1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1]]])
    torch.testing.assert_close(rope.apply(x, cos, sin), want)


def test_interleaved_rope_matches_deepseek_v3():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    cfg = RopeConfig(dim=8, theta=10000.0, kind="default", interleaved=True)
    rope = Rope(cfg)
    positions = torch.arange(5)
    q, k = torch.randn(5, 3, 8), torch.randn(5, 1, 8)  # [T, N, R]
    cos, sin = rope.cos_sin(positions)
    full_cos, full_sin = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]  # [1, T, R]
    want_q, want_k = apply_rotary_pos_emb_interleave(q.transpose(0, 1)[None], k.transpose(0, 1)[None], full_cos, full_sin)
    torch.testing.assert_close(rope.apply(q, cos, sin), want_q[0].transpose(0, 1))
    torch.testing.assert_close(rope.apply(k, cos, sin), want_k[0].transpose(0, 1))


@pytest.mark.parametrize("head_dim, rotary", [(8, 4), (16, 12), (8, 8)])
def test_partial_rotary_matches_transformers(head_dim, rotary):
    """The first `rotary` dims of each head rotate (rotate-half), the rest pass through unchanged."""
    from transformers.models.glm4_moe.modeling_glm4_moe import apply_rotary_pos_emb

    rope = Rope(RopeConfig(dim=rotary, theta=10000.0, kind="default", interleaved=False))
    q, k = torch.randn(5, 3, head_dim), torch.randn(5, 1, head_dim)  # [T, N, D]
    cos, sin = rope.cos_sin(torch.arange(5))
    full_cos, full_sin = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]  # [1, T, R]
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], full_cos, full_sin)
    assert torch.equal(rope.apply(q, cos, sin), want_q[0].transpose(0, 1))
    assert torch.equal(rope.apply(k, cos, sin), want_k[0].transpose(0, 1))


ROTARY_SPELLINGS = {  # config.json fields (None: removed) -> rotated dims of the tiny heads (GLM 8 dims, MiniMax 16)
    "glm4_moe top level": ("glm4_moe", {"partial_rotary_factor": 0.25}, 2),
    "glm4_moe in rope_parameters": ("glm4_moe", {"partial_rotary_factor": None, "rope_theta": None, "rope_parameters": {
        "rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.75}}, 6),
    "glm4_moe absent: transformers' default": ("glm4_moe", {"partial_rotary_factor": None}, 4),
    "minimax_m2 rotary_dim": ("minimax_m2", {"rotary_dim": 4}, 4),
}


@pytest.mark.parametrize("spelling", sorted(ROTARY_SPELLINGS))
def test_partial_rotary_dims_are_read_as_transformers_reads_them(spelling, tmp_path):
    """Oracle: the inverse frequencies of the family's own transformers rotary embedding."""
    import json

    from moegen.checkpoints.make import write_metadata

    family, overrides, want_dim = ROTARY_SPELLINGS[spelling]
    write_metadata(tmp_path, family, "tiny", overrides)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    cfg = load_model_config(tmp_path)
    hf_rope = hf_class(family, {"glm4_moe": "Glm4MoeRotaryEmbedding", "minimax_m2": "MiniMaxM2RotaryEmbedding"}[family])
    want = hf_rope(AutoConfig.from_pretrained(tmp_path)).inv_freq
    assert cfg.attention.rope.dim == want_dim == 2 * len(want)
    torch.testing.assert_close(inv_freq(cfg.attention.rope), want, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_router_matches_transformers(family, tiny_checkpoint):
    overrides = {"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3} if family == "deepseek_v2" else {}
    path = tiny_checkpoint(family, **overrides)
    cfg, weights, _ = load_checkpoint(path)
    layer = next(lw for lw in weights.layers if lw.moe is not None)
    hf_router = hf_class(family, ROUTERS[family])(AutoConfig.from_pretrained(path))
    hf_router.weight.data.copy_(layer.moe.router.gate)
    bias = layer.moe.router.e_score_correction_bias
    x = torch.randn(200, cfg.hidden_size)
    if bias is not None and not hasattr(hf_router, "e_score_correction_bias"):
        _, want_weights, want_experts = hf_router(x, bias)  # MiniMax-M2: the MoE block holds the bias, hands it over
    else:
        if bias is not None:
            hf_router.e_score_correction_bias.copy_(bias)
        _, want_weights, want_experts = hf_router(x)
    got = route(layer.moe.router, cfg.moe.router, x)
    order_got, order_want = got.experts.argsort(-1), want_experts.argsort(-1)
    assert torch.equal(got.experts.gather(1, order_got), want_experts.gather(1, order_want))
    torch.testing.assert_close(got.weights.gather(1, order_got), want_weights.float().gather(1, order_want))


def test_group_limited_routing_by_hand():
    # 4 experts in 2 groups, pick 2 experts from the best 1 group. Softmax scores of logits [3,0,2.9,2.8]:
    # group 0 = {0,1} best 3.0, group 1 = {2,3} best 2.9 -> only experts 0 and 1 are eligible.
    from moegen.config import RouterConfig

    cfg = RouterConfig(num_experts=4, top_k=2, scoring="softmax", topk_method="group_limited_greedy",
                       norm_topk_prob=False, routed_scaling_factor=1.0, n_group=2, topk_group=1,
                       correction_bias=False)
    logits = torch.tensor([[3.0, 0.0, 2.9, 2.8]])
    r = route(RouterWeights(gate=torch.eye(4)), cfg, logits)
    probs = logits.softmax(-1)[0]
    assert r.experts[0].tolist() == [0, 1]
    torch.testing.assert_close(r.weights[0], torch.stack([probs[0], probs[1]]))


def test_mla_absorbed_equals_expanded(tiny_checkpoint):
    cfg, weights, _ = load_checkpoint(tiny_checkpoint("deepseek_v3"))
    lw, rope = weights.layers[0], Rope(cfg.attention.rope)
    batch = AttnBatch.build(slots=[1, 0], past_lens=[3, 0], q_lens=[2, 5])
    x = torch.randn(7, cfg.hidden_size)
    outs = []
    for absorbed in (False, True):
        kv = allocate_kv(cfg, 2, 8, torch.float32)[0]
        torch.manual_seed(0)
        kv.latent.normal_(), kv.k_rope.normal_()  # a cached past for sequence 1
        outs.append(mla_attention(lw.attn, cfg.attention, rope, x, batch, kv, absorbed=absorbed))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_attention_mask_by_hand():
    batch = AttnBatch.build(slots=[0, 1], past_lens=[2, 0], q_lens=[1, 3])
    assert batch.positions.tolist() == [2, 0, 1, 2]
    T, F = True, False
    want = [
        [[T, T, T], [T, F, F], [T, F, F]],  # sequence 0: one new token at position 2; rows 1-2 are padding
        [[T, F, F], [T, T, F], [T, T, T]],  # sequence 1: three new tokens at 0, 1, 2
    ]
    assert batch.mask(None)[:, 0].tolist() == want
    windowed = [[[F, T, T], [T, F, F], [T, F, F]], [[T, F, F], [T, T, F], [F, T, T]]]
    assert batch.mask(2)[:, 0].tolist() == windowed


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_expert_gets_tokens_on_a_100_token_prompt(family, tiny_checkpoint):
    """Counted by transformers' own routers on the first 100 calibration tokens."""
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoint(family)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    idle = {}
    for index, layer in enumerate(hf.model.layers):
        if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "top_k"):
            layer.mlp.gate.register_forward_hook(
                lambda m, a, out, index=index: idle.__setitem__(
                    index, (torch.bincount(out[2].flatten(), minlength=m.num_experts) == 0).nonzero().flatten().tolist()))
    ids = calibration_ids(path / "tokenizer.json")[:HEAD_TOKENS]
    with torch.no_grad():
        hf(torch.tensor([ids]))
    assert idle and all(not v for v in idle.values()), idle


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sizes_keep_their_parameter_budget(family, size):
    low, high = PARAM_RANGE[size]
    assert low <= count_parameters(family, size) < high


def test_prompts_run_together_match_prompts_run_alone(tiny_checkpoint):
    """Batching invariance of the reference model (the runtime's oracle must not depend on its batch)."""
    cfg, weights, _ = load_checkpoint(tiny_checkpoint("deepseek_v2"))
    model = ReferenceModel(cfg, weights)
    prompts = [[1, 5, 9, 12], [1, 300, 301, 302, 303, 304, 305, 306, 307], [1, 42]]
    together = model.generate(prompts, 12, eos_ids=())
    for prompt, gen in zip(prompts, together):
        assert model.generate([prompt], 12, eos_ids=())[0].token_ids == gen.token_ids


def test_a_weight_reordered_for_onednn_computes_the_same_product():
    torch.manual_seed(0)
    w, b = torch.randn(200, 96), torch.randn(200)
    packed = pack_linear(w)
    assert packed.is_mkldnn or not torch.backends.mkldnn.is_available()
    for rows in (37, 300):  # 300: padded to a multiple of ROWS_BUCKET inside, cut back after
        x = torch.randn(rows, 96)
        want = x.double() @ w.double().T + b.double()  # the oracle: float64
        for weight in (w, packed):
            got = linear(x, weight, b)
            assert got.shape == (rows, 200) and got.dtype == torch.float32
            assert (got.double() - want).abs().max() / want.abs().max() < 1e-6


def test_bfloat16_weights_are_reordered_only_with_native_bf16_and_compute_what_f_linear_does(monkeypatch):
    from moegen.models import linear as linear_module

    torch.manual_seed(0)
    w, b = torch.randn(200, 96).bfloat16(), torch.randn(200).bfloat16()
    monkeypatch.setattr(linear_module, "native_bf16", lambda: False)
    assert not pack_linear(w).is_mkldnn  # emulated bf16: left as loaded
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return  # oneDNN has no bf16 reorder on this CPU (AVX2 only): the packed path can't be taken here
    monkeypatch.setattr(linear_module, "native_bf16", lambda: True)
    packed = pack_linear(w)
    assert packed.is_mkldnn and torch.equal(plain(packed), w)
    for rows in (1, 24, 300):  # 300: padded inside, cut back after
        x = torch.randn(rows, 96).bfloat16()
        got = linear(x, packed, b)
        assert got.dtype == torch.bfloat16 and torch.equal(got, F.linear(x, w, b))  # bit for bit


def test_the_cpu_backend_reorders_the_lm_head_unless_it_is_the_embedding(tiny_checkpoint):
    from moegen.models.hf_config import generation_eos_ids
    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.engine import Engine

    for tied in (False, True):
        path = tiny_checkpoint("mixtral", tie_word_embeddings=tied)
        cfg, weights, _ = load_checkpoint(path)
        with Engine(cfg, weights, RuntimeConfig(max_seq_len=32), generation_eos_ids(path, cfg)) as engine:
            core = engine.runtime.core
            assert core.lm_head.is_mkldnn != tied and (core.lm_head is core.embed_tokens) == tied
