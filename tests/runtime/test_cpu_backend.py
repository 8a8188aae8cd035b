"""The cpu backend's own ways: the compute stream's lanes (concurrent launches run side by side,
everything else keeps the stream's order, errors stay sticky, thread counts are set per lane
without leaking, a run with lanes gives the tokens a run without them gives), and residents reordered
for oneDNN and held once."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moegen.models.hf_config import generation_eos_ids
from moegen.models.loader import load_checkpoint
from moegen.runtime.backend import Counters
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.cpu_threads import LANES_ENV, cpu_lanes
from moegen.runtime.worker_stream import CpuStream
from moegen.runtime.engine import Engine
from moegen.runtime.requests import Request
from moegen.trace.summarize import parse


@pytest.fixture
def stream():
    s = CpuStream("compute", Counters(), record=True, lanes=2)
    yield s
    s.close()


def test_concurrent_items_run_side_by_side(stream):
    both = threading.Barrier(2, timeout=10)  # passes only if the two items run at the same time
    events = [stream.submit(both.wait, concurrent=True) for _ in range(2)]
    for event in events:
        event.block()  # raises BrokenBarrierError if they ran one after the other


def test_without_lanes_concurrent_items_run_in_order():
    s = CpuStream("compute", Counters(), lanes=1)
    try:
        seen = []
        events = [s.submit(lambda i=i: (time.sleep(0.02 * (3 - i)), seen.append(i)), concurrent=True) for i in range(3)]
        events[-1].block()
        assert seen == [0, 1, 2]
    finally:
        s.close()


def test_an_item_after_a_group_waits_for_all_of_it(stream):
    ended = []
    for delay in (0.15, 0.05, 0.1):
        stream.submit(lambda d=delay: (time.sleep(d), ended.append(d)), concurrent=True)
    seen = []
    stream.submit(lambda: seen.append(sorted(ended))).block()
    assert seen == [[0.05, 0.1, 0.15]]
    # busy time counts the group once (the lanes overlapped), not the sum of its items
    assert stream.intervals[0][1] - stream.intervals[0][0] < 0.15 + 0.1 + 0.05 - 0.05


def test_a_wait_does_not_stop_the_group_before_it(stream):
    """A streamed expert's wait for its copy sits between two concurrent launches: the first keeps
    running meanwhile, so the second can start beside it (here the first needs the second to finish)."""
    from moegen.runtime.worker_stream import CpuEvent

    release, got = threading.Event(), []
    copied = CpuEvent()
    first = stream.submit(lambda: got.append(release.wait(10)), concurrent=True)
    stream.wait_event(copied)
    second = stream.submit(release.set, concurrent=True)
    copied.finish()
    first.block()
    second.block()
    assert got == [True]


def test_a_failure_in_a_lane_is_sticky(stream):
    ran = []

    def boom():
        raise ValueError("expert launch failed")

    failed = stream.submit(boom, concurrent=True)
    after = stream.submit(lambda: ran.append("after"))
    with pytest.raises(ValueError, match="expert launch failed"):
        after.block()
    assert failed.error is not None and ran == []
    later = stream.submit(lambda: ran.append("later"), concurrent=True)
    with pytest.raises(ValueError):
        later.block()
    assert ran == []


def test_lanes_get_their_share_of_threads_and_nothing_else_changes():
    restore = torch.get_num_threads()
    before = 4
    torch.set_num_threads(before)
    s = CpuStream("compute", Counters(), lanes=2)
    try:
        counts = []
        events = [s.submit(lambda: counts.append(torch.get_num_threads()), concurrent=True) for _ in range(4)]
        for event in events:
            event.block()
        assert counts == [before // 2] * 4
        worker = []
        s.submit(lambda: worker.append(torch.get_num_threads())).block()
        fresh = []
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        t.start()
        t.join()
        # torch.set_num_threads on a lane also sets what later threads start with: the stream puts it back
        assert worker == [before] and fresh == [before] and torch.get_num_threads() == before
    finally:
        s.close()
        torch.set_num_threads(restore)


def test_lanes_setting(monkeypatch):
    monkeypatch.setenv(LANES_ENV, "1")
    assert cpu_lanes() == 1
    monkeypatch.setenv(LANES_ENV, "3")
    assert cpu_lanes() == 3
    for bad in ("0", "two"):
        monkeypatch.setenv(LANES_ENV, bad)
        with pytest.raises(ValueError, match=f"{LANES_ENV}={bad!r}: expected a whole number of lanes >= 1"):
            cpu_lanes()
    monkeypatch.delenv(LANES_ENV)
    restore = torch.get_num_threads()
    try:
        for threads, lanes in ((1, 1), (2, 2), (8, 2)):
            torch.set_num_threads(threads)
            assert cpu_lanes() == lanes
    finally:
        torch.set_num_threads(restore)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_a_run_on_lanes_gives_the_tokens_of_a_run_without(tiny_checkpoint, monkeypatch, tmp_path, family):
    """Greedy tokens equal with 2 lanes and with none (the expert/MLP adds commute up to float
    rounding, which the tiny models' greedy picks don't hit); the lanes' launches are on lane tracks,
    except a dense layer's MLP (DeepSeek's layer 0), which has nothing to run beside and keeps the stream."""
    path = tiny_checkpoint(family)
    cfg, weights, _ = load_checkpoint(path)
    requests = [Request([1, 5, 9, 12], 8), Request([1] + list(range(300, 330)), 8), Request([1, 42], 8)]
    tokens, tracks = {}, {}
    for lanes in ("1", "2"):
        monkeypatch.setenv(LANES_ENV, lanes)
        trace = tmp_path / f"lanes-{lanes}.pftrace"
        with Engine(cfg, weights, RuntimeConfig(max_seq_len=64), generation_eos_ids(path, cfg), trace=trace) as engine:
            tokens[lanes] = {r.id: r.token_ids for r in engine.generate(requests)}
        tracks[lanes] = {}
        for s in parse(trace).slices:
            if s.name.startswith(("expert[", "mlp[")):
                layer = int(s.name.split("[")[1].split("]")[0])
                kind = "dense mlp" if s.name.startswith("mlp[") and not cfg.moe_layers[layer] else s.name.split("[")[0]
                tracks[lanes].setdefault(kind, set()).add(s.track)
    lane_tracks = {"compute stream lane 1", "compute stream lane 2"}
    assert tokens["1"] == tokens["2"]
    assert all(t == {"compute stream"} for t in tracks["1"].values())
    assert tracks["2"]["expert"] == lane_tracks
    if family == "deepseek_v2":
        assert tracks["2"]["dense mlp"] == {"compute stream"} and tracks["2"]["mlp"] <= lane_tracks


def test_residents_are_reordered_for_onednn_and_held_once(tiny_checkpoint):
    """On the cpu backend a resident module's linears are oneDNN-reordered tensors, the loaded
    unit holds them (no host-arena copy beside them), and streamed modules stay plain views of the
    arena. A second engine made from the same (now reordered) weights streams experts and gives the
    tokens a freshly loaded model gives."""
    from moegen.runtime.residency import ModuleId

    path = tiny_checkpoint("mixtral")
    cfg, weights, _ = load_checkpoint(path)
    requests = [Request([1, 5, 9, 12], 8), Request([1] + list(range(300, 330)), 8)]
    eos = generation_eos_ids(path, cfg)
    with Engine(cfg, weights, RuntimeConfig(max_seq_len=64), eos) as engine:
        placement = engine.runtime.placement
        assert all(placement.blocks[m].flat is None for m in placement.resident) and not placement.pools
        expert = weights.layers[0].moe.experts[0]
        assert expert.gate_proj.is_mkldnn and expert.down_proj.is_mkldnn
        assert weights.layers[0].attn.q_proj.is_mkldnn and not weights.layers[0].input_layernorm.is_mkldnn
        assert placement.resident[ModuleId("expert", 0, 0)].weights.up_proj is expert.up_proj
        assert len(list(engine.generate(requests))) == len(requests)  # runs on the reordered weights
    streaming = RuntimeConfig(max_seq_len=64, expert_slots=2, resident_experts=1, gpu_memory=2**40)
    with Engine(cfg, weights, streaming, eos) as engine:
        placement = engine.runtime.placement
        streamed = [m for m in placement.blocks if m.kind == "expert" and placement.streamed(m)]
        assert streamed and all(placement.blocks[m].flat is not None for m in streamed)
        assert not weights.layers[-1].moe.experts[-1].gate_proj.is_mkldnn  # a view of the arena again
        again = {r.id: r.token_ids for r in engine.generate(requests)}
    cfg, fresh, _ = load_checkpoint(path)
    with Engine(cfg, fresh, streaming, eos) as engine:
        assert again == {r.id: r.token_ids for r in engine.generate(requests)}


def test_resident_experts_launch_largest_share_first(tiny_checkpoint, monkeypatch, tmp_path):
    """Within a step's layer the resident experts (launched one by one: --no-expert-groups) are submitted by
    descending token count (ties by index), so the lanes, each taking the next launch when free, end the layer
    together. One lane runs them in submission order, which the trace shows."""
    path = tiny_checkpoint("mixtral")
    cfg, weights, _ = load_checkpoint(path)
    monkeypatch.setenv(LANES_ENV, "1")
    trace = tmp_path / "order.pftrace"
    requests = [Request([1] + list(range(100 + 7 * i, 140 + 7 * i)), 4) for i in range(6)]
    rcfg = RuntimeConfig(max_seq_len=64, expert_groups=False)
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg), trace=trace) as engine:
        list(engine.generate(requests))
    launches: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for s in sorted(parse(trace).slices, key=lambda s: s.start):
        if s.name.startswith("expert["):
            layer, expert = (int(part.rstrip("]")) for part in s.name.split("[")[1:3])
            launches.setdefault((s.args["step"], layer), []).append((s.args["tokens"], expert))
    assert len(launches) == 4 * cfg.num_layers  # 4 steps (one prefill, 3 decode)
    unequal = 0
    for order in launches.values():
        assert order == sorted(order, key=lambda te: (-te[0], te[1])), order
        unequal += len({tokens for tokens, _ in order}) > 1
    assert unequal > 0  # the routing did give experts different shares
