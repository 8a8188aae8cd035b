"""The planner: plans fit both memory budgets (checked against the runtime built from them), the
user's knobs are never changed, the cost model's critical path matches hand-derived timelines, and
the calibration cache is dropped when the device, machine or versions change."""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import orjson
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moegen.cli import main
from moegen.models.loader import load_checkpoint
from moegen.planner import calibrate
from moegen.planner.calibrate import Calibration, Curve, Linear, Machine, Profile
from moegen.planner.cost import ModelFacts, Workload, setting, step_time
from moegen.planner.profile import _launch_times
from moegen.planner.search import PLANNED, search
from moegen.runtime.backend import DeviceBudgetError
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.cpu_threads import LANES_ENV
from moegen.runtime.engine import Engine
from moegen.runtime.residency import minimum_device_bytes

MS = 1e-3


def flat_profile(seconds: float = MS) -> Profile:
    """Every launch takes `seconds`, whatever its size."""
    c = Curve([(1.0, seconds), (1e9, seconds)])
    return Profile(expert=c, mlps={"dense": c, "shared": c}, router=c, attn_decode=Linear([seconds, 0, 0]),
                   attn_prefill=Linear([seconds, 0, 0]), head=c, combine=c)


MACHINE = Machine(link_h2d_gbps=None, link_d2h_gbps=None, memcpy_gbps=1e6, launch_s=0.0, sync_s=0.0)


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    """(cfg, weights) of tiny checkpoints: four families as made, then four of random shapes (seeded:
    layers, experts, top-k, expert width)."""
    made = [tiny_checkpoint("mixtral"), tiny_checkpoint("deepseek_v2"), tiny_checkpoint("qwen2_moe"),
            tiny_checkpoint("olmoe")]
    rng = random.Random(7)
    experts_key = {"mixtral": "num_local_experts", "deepseek_v2": "n_routed_experts", "qwen2_moe": "num_experts",
                   "olmoe": "num_experts"}
    width_key = {"mixtral": "intermediate_size", "deepseek_v2": "moe_intermediate_size",
                 "qwen2_moe": "moe_intermediate_size", "olmoe": "intermediate_size"}
    for family in experts_key:
        experts = rng.choice([4, 8, 16, 32])
        made.append(tiny_checkpoint(family, **{"num_hidden_layers": rng.randint(2, 4), experts_key[family]: experts,
                                               "num_experts_per_tok": rng.randint(1, min(4, experts)),
                                               width_key[family]: rng.choice([16, 48, 96])}))
    return [load_checkpoint(path)[:2] for path in made]


# -- curves ---------------------------------------------------------------------------------------


def test_curve_interpolates_in_log_space_and_extrapolates_in_proportion():
    c = Curve([(1.0, 1.0), (100.0, 10.0)])
    assert c(10.0) == pytest.approx(10 ** 0.5)  # halfway in log size, halfway in log time
    assert c(0.5) == 1.0  # below the smallest size: its time
    assert c(300.0) == pytest.approx(30.0)  # beyond: in proportion to the size
    assert Linear([1.0, 2.0, 0.5])(3, 4) == pytest.approx(1 + 6 + 2)


# -- the cost model against timelines worked out by hand ------------------------------------------


def test_step_time_without_a_link_is_the_sum_of_launches(models):
    cfg, weights = models[0]  # mixtral tiny: every layer MoE, no shared expert
    facts = ModelFacts.of(cfg, weights, torch.float32)
    s = setting(facts, RuntimeConfig(batch_size=8, attn_micro_batch=4, max_seq_len=32), MACHINE, None)
    E, L = cfg.moe.router.num_experts, cfg.num_layers
    t = step_time(facts, s, flat_profile(), MACHINE, decode=8, context=10)
    # embed, per layer 2 attention micro-batches + router + E experts (8 tokens x top-k cover all) + combine, head
    launches = 1 + L * (2 + 1 + E + 1) + 1
    assert t.seconds == pytest.approx(launches * MS)
    assert t.link_s == 0 and t.bound == "compute"
    assert t.modules["expert"] == pytest.approx(L * E * MS)


def test_streamed_experts_wait_for_their_copies(models):
    """One expert slot: each copy waits for the previous expert's compute, so copy and compute
    alternate (copy + compute per expert). Two slots: the copies run back to back behind compute,
    and the link bounds the step (one copy per expert)."""
    cfg, weights = models[0]
    facts = ModelFacts.of(cfg, weights, torch.float32)
    expert_bytes = next(s.host for m, s in facts.sizes.items() if m.kind == "expert")
    copy_s = 10 * MS
    link = expert_bytes / copy_s / 1e9
    E, L = cfg.moe.router.num_experts, cfg.num_layers
    base = RuntimeConfig(batch_size=8, attn_micro_batch=8, max_seq_len=32, gpu_memory=2**40, sim_link_gbps=link)
    times = {}
    for slots in (1, 2):
        s = setting(facts, dataclasses.replace(base, expert_slots=slots), MACHINE, 2**40)
        assert s.residency.pools == {"expert": slots}
        times[slots] = step_time(facts, s, flat_profile(), MACHINE, decode=8, context=10)
    experts = L * E
    # each expert: its copy (10 ms) then its compute (1 ms); the rest of the step hides nowhere
    assert times[1].seconds == pytest.approx(experts * (copy_s + MS), rel=0.1)
    # the link is busy with every expert's copy; compute hides behind it
    assert times[2].seconds == pytest.approx(experts * copy_s, rel=0.1)
    # the weights link carries every expert once (the cpu backend's KV copies have a link of their own)
    assert times[2].bound == "link" and times[2].link_s == pytest.approx(experts * copy_s)
    # streamed experts compute over plain weights: with those taking 5 ms, one slot alternates 10 + 5 ms
    slow = dataclasses.replace(flat_profile(), expert_plain=Curve([(1.0, 5 * MS), (1e9, 5 * MS)]))
    one = setting(facts, dataclasses.replace(base, expert_slots=1), MACHINE, 2**40)
    assert step_time(facts, one, slow, MACHINE, decode=8, context=10).seconds == pytest.approx(
        experts * (copy_s + 5 * MS), rel=0.1)
    # ... and a resident expert still takes the reordered weights' 1 ms: all resident, no link
    resident = setting(facts, dataclasses.replace(base, gpu_memory=None, sim_link_gbps=None), MACHINE, None)
    assert step_time(facts, resident, slow, MACHINE, decode=8, context=10).seconds == pytest.approx(
        step_time(facts, resident, flat_profile(), MACHINE, decode=8, context=10).seconds)


# -- the search -----------------------------------------------------------------------------------


workloads = st.builds(Workload, requests=st.integers(1, 600), prompt_len=st.integers(1, 40),
                      new_tokens=st.integers(1, 40), max_seq_len=st.just(96))
user_knobs = st.fixed_dictionaries({}, optional={
    "batch_size": st.integers(1, 64), "attn_micro_batch": st.integers(1, 64),
    "expert_micro_batch": st.integers(1, 64), "expert_slots": st.integers(1, 8),
    "resident_experts": st.integers(0, 4), "max_step_tokens": st.integers(1, 2000)})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 7), share=st.floats(0.0, 1.5), workload=workloads, knobs=user_knobs,
       link=st.sampled_from([None, 0.05, 5.0]))
def test_plans_fit_both_budgets_and_keep_the_users_knobs(models, index, share, workload, knobs, link):
    cfg, weights = models[index]
    floor = minimum_device_bytes(weights, torch.float32, None)
    budget = int(floor * (1 + share)) + 2**16
    host_kv = 2**20  # 1 MiB of host KV: a few dozen sequences of these tiny models at most
    rcfg = RuntimeConfig(max_seq_len=workload.max_seq_len, gpu_memory=budget, sim_link_gbps=link, **knobs)
    facts = ModelFacts.of(cfg, weights, torch.float32)
    try:
        plan = search(facts, rcfg, frozenset(knobs), MACHINE, flat_profile(), workload, budget, host_kv)
    except (DeviceBudgetError, ValueError):
        return  # nothing fits: an error naming the knob, never a plan that doesn't fit
    assert plan.user == tuple(sorted(knobs))
    for name, value in knobs.items():  # the user's knobs, exactly as given
        assert getattr(plan.rcfg, name) == value
    for c in [plan.best] + plan.alternatives:
        assert c.setting.device_bytes <= budget
        assert c.setting.host_bytes - facts.arena_bytes <= max(host_kv, 0) or "batch_size" in knobs
        for name, value in knobs.items():
            assert getattr(c.rcfg, name) == value
    # the runtime built from the plan takes exactly the device and host memory the plan says
    with Engine(cfg, weights, plan.rcfg, ()) as engine:
        counters = engine.backend.counters
        assert counters.device_high_water <= budget
        assert counters.device_bytes == plan.best.setting.device_bytes
        assert engine.runtime.host_bytes == plan.best.setting.host_bytes
        assert engine.runtime.batch_size == plan.best.setting.batch


def test_offload_plan_prefers_a_larger_batch_when_the_link_bounds(models):
    """Under a tight budget and a slow link the step is link-bound, so the plan takes the largest
    batch the host allows (each copied byte serves more tokens)."""
    cfg, weights = models[0]
    facts = ModelFacts.of(cfg, weights, torch.float32)
    budget = minimum_device_bytes(weights, torch.float32, None) + 2 * 2**20  # B=512's activations and transient
    # memory: with a small step
    rcfg = RuntimeConfig(max_seq_len=32, gpu_memory=budget, sim_link_gbps=0.01)
    plan = search(facts, rcfg, frozenset(), MACHINE, flat_profile(), Workload(512, 8, 16, 32), budget, 2**40)
    assert plan.best.setting.batch == 512
    assert plan.rcfg.max_step_tokens == 512 - 1 + 32  # the default step's activations would not fit
    assert plan.best.predicted.decode.bound == "link"
    assert all(c.predicted.job_tok_s <= plan.best.predicted.job_tok_s for c in plan.alternatives)


def test_the_batch_is_planned_from_the_kv_a_sequence_is_expected_to_hold(models):
    """Under one host KV budget of 64 blocks of 16 tokens: rows of 8 prompt tokens whose caps average 24 are
    expected to hold 2 blocks each, so 32 run at once, though only 8 could each reach the longest row's 128
    tokens; the plan's KV is exactly those blocks, and a shared prefix shortens the predicted prefill."""
    from moegen.models.kv_cache import kv_bytes_per_token
    from moegen.planner.plan import format_plan

    cfg, weights = models[0]
    facts = ModelFacts.of(cfg, weights, torch.float32)
    host_kv = 64 * 16 * kv_bytes_per_token(cfg, torch.float32)
    rcfg = RuntimeConfig(max_seq_len=128, host_kv_memory=host_kv)
    user = frozenset({"host_kv_memory"})
    plan = search(facts, rcfg, user, MACHINE, flat_profile(), Workload(512, 8, 24, 128, caps_differ=True), None, host_kv)
    assert plan.best.setting.batch == 32 and plan.best.setting.kv_blocks == 64
    assert plan.best.setting.host_bytes == facts.arena_bytes + host_kv
    assert "64 blocks of 16 tokens" in format_plan(plan) and "no preemptions expected" in format_plan(plan)
    shared = search(facts, rcfg, user, MACHINE, flat_profile(),
                    Workload(512, 8, 24, 128, prefix_hit_rate=0.5, caps_differ=True), None, host_kv)
    assert shared.best.predicted.job_s < plan.best.predicted.job_s


def test_the_workloads_prefix_hit_rate_counts_the_full_blocks_later_prompts_share():
    """Three prompts of one 40-token prefix + 3 own tokens, blocks of 16: the two after the first find the
    prefix's 2 full blocks (64 of 129 prompt tokens); without sharing, none."""
    from moegen.planner.plan import workload_of
    from moegen.runtime.requests import Request

    prefix = list(range(100, 140))
    requests = [Request(prefix + [i, i + 1, i + 2], 4) for i in range(3)]
    assert workload_of(requests, RuntimeConfig(kv_block_size=16)).prefix_hit_rate == pytest.approx(64 / 129)
    assert workload_of(requests, RuntimeConfig(kv_block_size=16, prefix_sharing=False)).prefix_hit_rate == 0


# -- calibration cache ----------------------------------------------------------------------------


def test_calibration_cache_is_dropped_for_another_version_machine_or_device(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="Fake GPU 80GB", total_memory=80 * 2**30))
    cal = Calibration(calibrate.device_key("cpu"), MACHINE, {"model": flat_profile()})
    calibrate.save(cal)
    loaded = calibrate.load("cpu")
    assert loaded is not None and loaded.machine == MACHINE
    assert loaded.profiles["model"].expert(5.0) == pytest.approx(MS)
    assert calibrate.load("cuda") is None  # another device
    calibrate.save(Calibration(calibrate.device_key("cuda"), MACHINE))
    assert calibrate.load("cuda") is not None and calibrate.load("cpu") is not None
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="Other GPU", total_memory=24 * 2**30))
    assert calibrate.load("cuda") is None  # another GPU
    monkeypatch.setattr(calibrate, "_cpu_name", lambda: "Another CPU")
    assert calibrate.load("cpu") is None  # another machine
    monkeypatch.undo()
    monkeypatch.setenv("MOEGEN_CACHE", str(tmp_path))
    assert calibrate.load("cpu") is not None
    monkeypatch.setenv(LANES_ENV, "3")
    assert calibrate.load("cpu") is None  # launches run on other lanes
    monkeypatch.undo()
    monkeypatch.setenv("MOEGEN_CACHE", str(tmp_path))
    assert calibrate.load("cpu") is not None
    monkeypatch.setattr(calibrate, "version", lambda package: "0.0.0.other")
    assert calibrate.load("cpu") is None  # another moegen
    monkeypatch.setattr(calibrate, "version", lambda package: __import__("importlib.metadata").metadata.version(package))
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert calibrate.load("cpu") is None  # another torch
    path = calibrate.cache_path(calibrate.device_key("cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"{not json")
    assert calibrate.load("cpu") is None  # a damaged file is measured again, not an error


def test_in_run_times_of_launches_side_by_side_are_shared_out_by_group():
    """Lane slices that overlap form one group whose wall time is shared out in proportion to each
    launch's profiled time; slices on the stream itself count alone. By hand (ms): the profile says
    an expert over t tokens takes t ms; lanes run expert 2 tok [0, 3) and 6 tok [1, 9) (group: 9 ms
    for 8 ms alone), then 4 tok [12, 16) alone on a lane (a group of one); the stream runs a
    router [9, 10) (profile 1 ms)."""
    from moegen.trace.slices import Slice

    c = Curve([(1.0, MS), (1e9, 1e9 * MS)])
    profile = dataclasses.replace(flat_profile(), expert=c)
    slices = [Slice("compute stream lane 1", "expert[0][0]", 0, 3_000_000, {"tokens": 2}),
              Slice("compute stream lane 2", "expert[0][1]", 1_000_000, 9_000_000, {"tokens": 6}),
              Slice("compute stream", "router[0]", 9_000_000, 10_000_000, {"tokens": 8}),
              Slice("compute stream lane 2", "expert[0][2]", 12_000_000, 16_000_000, {"tokens": 4}),
              Slice("event loop", "step 0", 0, 20_000_000)]
    got = sorted(_launch_times(slices, profile, SimpleNamespace()))
    want = sorted([("expert", 9 * MS * 2 / 8, 2 * MS), ("expert", 9 * MS * 6 / 8, 6 * MS),
                   ("router", 1 * MS, 1 * MS), ("expert", 4 * MS, 4 * MS)])
    assert got == [(kind, pytest.approx(run), pytest.approx(alone)) for kind, run, alone in want]


# -- the command line -----------------------------------------------------------------------------


def test_plan_json_keeps_the_users_knobs(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_CACHE", str(tmp_path / "cache"))
    path = tiny_checkpoint("mixtral")
    result = CliRunner().invoke(main, ["plan", str(path), "--requests", "40", "--prompt-len", "6",
                                       "--max-new-tokens", "4", "--batch-size", "7", "--json"])
    assert result.exit_code == 0, result.output
    plan = orjson.loads(result.stdout)
    assert set(plan["knobs"]) == set(PLANNED) and plan["knobs"]["batch_size"] == 7
    assert plan["user_knobs"] == ["batch_size"]
    assert plan["predicted"]["prefill_tok_s"] > 0 and plan["predicted"]["decode_tok_s"] > 0
    assert set(plan["bound"]) == {"prefill", "decode"} and isinstance(plan["alternatives"], list)
    assert all(a["knobs"]["batch_size"] == 7 for a in plan["alternatives"])
    # calibrated once, then read from the cache
    assert list((tmp_path / "cache" / "calibration").glob("cpu-*.json"))
    text = CliRunner().invoke(main, ["plan", str(path), "--requests", "40", "--prompt-len", "6"])
    assert text.exit_code == 0 and "calibrating" not in text.stderr and "knobs:" in text.stdout
    assert "batch_size=" in text.stdout and "predicted: prefill" in text.stdout and "bound:" in text.stdout


def test_plan_errors_name_the_input_and_the_fix(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_CACHE", str(tmp_path / "cache"))
    path = str(tiny_checkpoint("mixtral"))
    tight = CliRunner().invoke(main, ["plan", path, "--gpu-memory", "10KiB"])
    assert tight.exit_code != 0 and "--gpu-memory" in tight.stderr and "Traceback" not in tight.output
    wrong = CliRunner().invoke(main, ["plan", path, "--no-plan"])
    assert wrong.exit_code != 0 and "only plans" in wrong.stderr
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda = CliRunner().invoke(main, ["plan", path, "--device", "cuda"])
    assert cuda.exit_code != 0 and "--device cuda" in cuda.stderr and "Traceback" not in cuda.output


def test_serve_offline_plans_around_the_users_knobs_and_records_the_plan(tiny_checkpoint, tmp_path):
    from moegen.trace.summarize import summarize

    path = tiny_checkpoint("deepseek_v2")
    dataset = tmp_path / "data.jsonl"
    dataset.write_text("".join(orjson.dumps({"prompt": f"row {i} says hello"}).decode() + "\n" for i in range(12)))

    def serve(name, *flags):
        stats, out = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
        result = CliRunner().invoke(main, ["serve-offline", str(path), "--dataset", str(dataset), "--output", str(out),
                                           "--max-new-tokens", "5", "--ignore-eos", "--stats-json", str(stats),
                                           *flags])
        assert result.exit_code == 0, result.output
        return orjson.loads(stats.read_bytes()), result.stderr, [orjson.loads(x) for x in out.read_bytes().splitlines()]

    trace = tmp_path / "run.pftrace"
    stats, err, results = serve("planned", "--attn-micro-batch", "3", "--trace", str(trace))
    plan = stats["plan"]
    assert plan["knobs"]["attn_micro_batch"] == 3 and plan["user_knobs"] == ["attn_micro_batch"]
    assert plan["workload"] == {"requests": 12, "prompt_len": pytest.approx(plan["workload"]["prompt_len"]),
                                "new_tokens": 5, "max_seq_len": plan["workload"]["max_seq_len"],
                                "prefix_hit_rate": plan["workload"]["prefix_hit_rate"], "caps_differ": False}
    assert "moegen: plan: knobs:" in err and "attn_micro_batch=3 (yours)" in err
    versus = summarize(trace)["plan"]
    assert versus is not None and versus["decode_tok_s"]["predicted"] == pytest.approx(plan["predicted"]["decode_tok_s"])
    assert versus["decode_steps"] >= 1 and versus["modules"]["attention"]["measured"] > 0
    unplanned, err, plain = serve("unplanned", "--no-plan")
    assert unplanned["plan"] is None and "plan:" not in err
    by_id = lambda rows: {r["id"]: r["text"] for r in rows}  # noqa: E731
    assert by_id(results) == by_id(plain)  # greedy tokens don't depend on the knobs


@pytest.mark.parametrize("host_s, chosen", [(1e-6, True), (1.0, False)])
def test_a_share_of_decode_attention_goes_to_the_host_when_it_shortens_the_step(models, host_s, chosen):
    """Long contexts over a slow link, every module resident: staging the KV is the step's bound. Host attention
    that takes 1 us a layer is planned (a share > 0: less KV crosses); one that takes 1 s is not."""
    from moegen.planner.plan import format_plan

    cfg, weights = models[0]
    facts = ModelFacts.of(cfg, weights, torch.float32)
    profile = flat_profile()
    profile.host_attn = Linear([host_s, 0, 0])
    rcfg = RuntimeConfig(max_seq_len=256, gpu_memory=2**32, sim_link_gbps=0.1)
    plan = search(facts, rcfg, frozenset({"batch_size"}), MACHINE, profile, Workload(64, 200, 16, 256), 2**32, 2**40)
    assert (plan.rcfg.cpu_attention > 0) == chosen, plan.rcfg.cpu_attention
    assert ("host attention:" in format_plan(plan)) == chosen
    no_host = flat_profile()  # not measured: never planned
    assert search(facts, rcfg, frozenset({"batch_size"}), MACHINE, no_host, Workload(64, 200, 16, 256), 2**32,
                  2**40).rcfg.cpu_attention == 0


def test_the_faster_cpu_dtype_is_said_at_start():
    """Calibration times one expert-sized matmul in both dtypes; --dtype bfloat16 on the cpu where it ran slower
    gets one line saying so and by how much; float32 where bfloat16 ran well faster gets one naming
    --dtype bfloat16; nothing else."""
    from moegen.planner.calibrate import Machine
    from moegen.planner.plan import cpu_dtype_note

    def said(speedup: float, dtype: str) -> list[str]:
        lines: list[str] = []
        machine = Machine(None, None, memcpy_gbps=10.0, launch_s=1e-5, sync_s=1e-4, bf16_speedup=speedup)
        cpu_dtype_note(RuntimeConfig(device="cpu", dtype=dtype), machine, lines.append)
        return lines

    (line,) = said(0.17, "bfloat16")
    assert "slower than float32" in line and "0.17x" in line and "--dtype float32" in line
    assert said(1.7, "bfloat16") == [] and said(0.17, "float32") == [] and said(0.0, "bfloat16") == []
    (line,) = said(1.7, "float32")
    assert "1.70x float32's" in line and "--dtype bfloat16" in line
    assert said(1.1, "float32") == [] and said(0.0, "float32") == [] and said(1.7, "float16") == []
