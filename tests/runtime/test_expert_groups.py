"""Grouped expert launches: how a layer's experts are cut into groups, a group's launch against one launch
per expert, and a traced run's groups against its routing."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from moegen.models.hf_config import generation_eos_ids
from moegen.models.loader import load_checkpoint
from moegen.models.weights import MLPWeights
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.engine import Engine
from moegen.runtime.requests import Request
from moegen.runtime.tasks.expert_groups import plan_groups, group_launch
from moegen.runtime.tasks.moe import expert_launch
from moegen.trace.summarize import parse, summarize


def test_groups_cover_the_grouped_experts_with_tokens_in_runs_of_the_routing_order():
    counts = [5, 0, 3, 7, 2, 0, 4, 6]
    grouped = [True, True, True, False, True, True, True, True]  # expert 3 streamed: it ends a run
    groups = plan_groups(counts, grouped, pieces=2)
    members = sorted(e for g in groups for e in g.experts)
    assert members == [0, 2, 4, 6, 7]  # every grouped expert with tokens, once; none without
    starts = [sum(counts[:e]) for e in range(len(counts))]
    for g in groups:
        assert g.start == starts[g.experts[0]]
        assert g.counts == tuple(counts[e] for e in g.experts)
        # the members' picks are one contiguous run: nothing streamed with tokens lies between them
        assert sum(counts[g.experts[0]: g.experts[-1] + 1]) == g.tokens
        assert 3 not in range(g.experts[0], g.experts[-1] + 1)
    assert [g.tokens for g in groups] == sorted((g.tokens for g in groups), reverse=True)


def test_pieces_balance_tokens_and_one_piece_is_one_group():
    counts = [10] * 16
    groups = plan_groups(counts, [True] * 16, pieces=4)
    assert [g.tokens for g in groups] == [40, 40, 40, 40]
    assert len(plan_groups(counts, [True] * 16, pieces=1)) == 1
    assert plan_groups(counts, [False] * 16, pieces=4) == []
    assert plan_groups([0] * 4, [True] * 4, pieces=2) == []


@pytest.mark.parametrize("cap", [None, 3])
def test_a_group_launch_adds_what_one_launch_per_expert_adds(cap):
    torch.manual_seed(0)
    T, H, I, E, K = 20, 16, 24, 6, 2
    units = [MLPWeights(torch.randn(I, H), torch.randn(I, H), torch.randn(H, I)) for _ in range(E)]
    x = torch.randn(T, H)
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)])  # [T, K]
    weights = torch.rand(T, K)
    order = experts.flatten().argsort(stable=True)
    counts = torch.bincount(experts.flatten(), minlength=E).tolist()
    grouped = [e != 2 for e in range(E)]  # expert 2 runs alone
    expected, got = torch.zeros(T, H), torch.zeros(T, H)
    starts = [sum(counts[:e]) for e in range(E)]
    for e in range(E):
        expert_launch(units[e], x, expected, order[starts[e]: starts[e] + counts[e]], weights, K, cap)
    groups = plan_groups(counts, grouped, pieces=2)
    for g in groups:
        group_launch([units[e] for e in g.experts], g, x, got, order, weights, K, cap)
    expert_launch(units[2], x, got, order[starts[2]: starts[2] + counts[2]], weights, K, cap)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def traced(path, out, **knobs):
    cfg, weights, _ = load_checkpoint(path)
    rcfg = RuntimeConfig(max_seq_len=64, batch_size=4, **knobs)
    prompts = [[1, 5, 9, 12], [1] + list(range(300, 320)), [1, 42], [1, 7, 7, 100], [1, 3, 4]]
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg), trace=out) as engine:
        list(engine.generate([Request(p, 5) for p in prompts]))
    return cfg, engine


@pytest.mark.parametrize("knobs", [{}, {"resident_experts": 3, "expert_slots": 2}], ids=["resident", "some-streamed"])
def test_a_traced_grouped_run_accounts_for_every_routed_token(tiny_checkpoint, tmp_path, knobs):
    """In each layer's step the tokens of its groups' members and of the experts that ran alone add up to the
    routed tokens (the step's tokens x top-k); only residents are grouped; summarize gives each expert a time."""
    out = tmp_path / "run.pftrace"
    cfg, engine = traced(tiny_checkpoint("deepseek_v2"), out, **knobs)
    resident = {(m.layer, m.expert) for m in engine.runtime.placement.resident_modules if m.kind == "expert"}
    slices = [s for s in parse(out).slices if "compute" in s.track]
    routed, ran = {}, defaultdict(int)
    grouped_any = False
    for s in slices:
        key = (s.args.get("step"), s.args.get("layer"))
        if s.name.startswith("router["):
            routed[key] = int(s.args["tokens"]) * cfg.moe.router.top_k
        elif s.name.endswith("] group"):
            grouped_any = True
            for member in str(s.args["experts"]).split():
                e, n = map(int, member.split(":"))
                assert (key[1], e) in resident, f"streamed expert[{key[1]}][{e}] in a group"
                ran[key] += n
            assert sum(int(m.split(":")[1]) for m in str(s.args["experts"]).split()) == s.args["tokens"]
        elif s.name.startswith("expert["):
            ran[key] += int(s.args["tokens"])
    assert grouped_any
    moe_keys = {k for k in routed if cfg.moe_layers[k[1]]}
    assert moe_keys and all(ran[k] == routed[k] for k in moe_keys), (dict(ran), routed)
    experts = summarize(out)["experts"]
    assert experts and all(v["s"] > 0 and v["tokens"] > 0 for v in experts.values())
    assert sum(v["tokens"] for v in experts.values()) == sum(routed[k] for k in moe_keys)


def test_no_expert_groups_launches_each_expert_alone(tiny_checkpoint, tmp_path):
    out = tmp_path / "run.pftrace"
    traced(tiny_checkpoint("deepseek_v2"), out, expert_groups=False)
    names = [s.name for s in parse(out).slices if "compute" in s.track]
    assert not any(n.endswith("] group") for n in names)
    assert any(n.startswith("expert[") for n in names)
