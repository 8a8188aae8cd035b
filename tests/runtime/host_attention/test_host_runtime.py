"""Host attention in the runtime: what crosses the link for host-attended sequences (by hand), that nothing of
their KV is staged, that the host's attention overlaps the device's work, and that its failure ends the run."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moegen.config import MLAConfig
from moegen.models.hf_config import generation_eos_ids
from moegen.models.loader import load_checkpoint
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.engine import Engine
from moegen.runtime.requests import Request

BLOCK, PROMPT, NEW = 4, 6, 5
REQUESTS = [Request([1, 10 + i, 20 + i, 30 + i, 40 + i, 50 + i], NEW, ignore_eos=True) for i in range(4)]


def traced(path, tmp_path, share: float, **knobs):
    from moegen.trace.summarize import parse

    cfg, weights, _ = load_checkpoint(path)
    rcfg = RuntimeConfig(max_seq_len=16, batch_size=4, kv_block_size=BLOCK, gpu_memory=2**40, sim_link_gbps=50.0,
                         cpu_attention=share, **knobs)
    trace = tmp_path / f"share{share}.pftrace"
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg), trace=trace) as engine:
        results = {r.id: r.token_ids for r in engine.generate(REQUESTS)}
    return cfg, results, parse(trace).slices


def bytes_by(slices, prefix: str) -> dict[tuple[int, int], int]:
    """Bytes of the copies named `prefix`..., per (step, layer)."""
    out: dict[tuple[int, int], int] = {}
    for s in slices:
        if s.name.startswith(prefix):
            key = (int(s.args["step"]), int(s.args["layer"]))
            out[key] = out.get(key, 0) + int(s.args["bytes"])
    return out


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_only_q_new_kv_and_the_output_cross_for_host_sequences(family, tiny_checkpoint, tmp_path):
    """4 sequences, 2 of them on the host (share 0.5) in each of the 4 decode steps: per step and layer the KV
    staged falls by exactly their KV (2 sequences x the context in whole blocks x per-position bytes), and the
    copies that do cross for them are q and the new k/v (MLA: latent-space q, q_rope, latent, rope key) in, the
    attention output (MLA: weighted latents) back, by hand from the config; the tokens are the same."""
    path = tiny_checkpoint(family)
    cfg, tokens0, slices0 = traced(path, tmp_path, 0.0)
    _, tokens5, slices5 = traced(path, tmp_path, 0.5)
    assert tokens5 == tokens0
    a, elem = cfg.attention, 4  # float32
    if isinstance(a, MLAConfig):
        per_position = a.kv_lora_rank + a.qk_rope_head_dim
        sent = a.num_heads * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank + a.qk_rope_head_dim
        back = a.num_heads * a.kv_lora_rank
    else:
        per_position = 2 * a.num_kv_heads * a.head_dim
        sent = a.num_heads * a.head_dim + 2 * a.num_kv_heads * a.head_dim
        back = a.num_heads * a.head_dim
    staged0, staged5 = bytes_by(slices0, "stage KV["), bytes_by(slices5, "stage KV[")
    sends, returns = bytes_by(slices5, "send to host attention["), bytes_by(slices5, "return host attention[")
    assert not bytes_by(slices0, "send to host attention[")
    decode_steps = range(1, NEW)
    for step in decode_steps:
        context = PROMPT + step  # past + the new token
        whole = -(-context // BLOCK) * BLOCK
        for layer in range(cfg.num_layers):
            assert staged0[step, layer] - staged5[step, layer] == 2 * whole * per_position * elem, (step, layer)
            assert sends[step, layer] == 2 * sent * elem and returns[step, layer] == 2 * back * elem
    assert set(sends) == {(s, l) for s in decode_steps for l in range(cfg.num_layers)}


def test_host_attention_overlaps_the_devices_attention(tiny_checkpoint, tmp_path, monkeypatch):
    """Each device attention launch and each host attention held 30 ms longer: the host attention of a layer and
    step, submitted first, runs while the device attends the other share (serialized, they could not overlap)."""
    import moegen.runtime.host_attention.worker as worker
    import moegen.runtime.tasks.attention as attention_tasks

    attend, decode = attention_tasks._attend, worker.gqa_decode

    def slow(rt, layer, step, mb, w, kv):
        attend(rt, layer, step, mb, w, kv)
        time.sleep(0.03)

    def slow_host(*args):
        time.sleep(0.03)
        return decode(*args)

    monkeypatch.setattr(attention_tasks, "_attend", slow)
    monkeypatch.setattr(worker, "gqa_decode", slow_host)
    _, _, slices = traced(tiny_checkpoint("mixtral"), tmp_path, 0.5)
    host = [s for s in slices if s.name.startswith("host attention[")]
    device = {(s.args["step"], s.args["layer"]): s for s in slices
              if s.name.startswith("attention[") and s.args["tokens"] == s.args["sequences"]}
    assert host and device
    overlapping = [h for h in host if (d := device.get((h.args["step"], h.args["layer"])))
                   and h.start < d.end and d.start < h.end]
    assert len(overlapping) >= len(host) // 2, (len(overlapping), len(host))


def test_a_host_attention_failure_ends_the_run_with_its_exception_and_no_thread_left(tiny_checkpoint, monkeypatch):
    import moegen.runtime.host_attention.worker as worker

    def broken(*args, **kwargs):
        raise FloatingPointError("host attention broke")

    monkeypatch.setattr(worker, "gqa_decode", broken)
    path = tiny_checkpoint("mixtral")
    cfg, weights, _ = load_checkpoint(path)
    rcfg = RuntimeConfig(max_seq_len=16, batch_size=4, kv_block_size=BLOCK, gpu_memory=2**40, cpu_attention=1.0)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(FloatingPointError, match="host attention broke"):
        with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg)) as engine:
            list(engine.generate(REQUESTS))
    time.sleep(0.2)
    left = {t.name for t in threading.enumerate()} - before
    assert not any(name.startswith("moegen") for name in left), left


def test_a_host_share_with_model_batching_is_an_error_naming_both_flags():
    with pytest.raises(ValueError, match="--cpu-attention.*--batching model"):
        RuntimeConfig(batching="model", cpu_attention=0.5)
    with pytest.raises(ValueError, match="0 to 1"):
        RuntimeConfig(cpu_attention=1.5)


def test_the_plans_device_bytes_count_the_host_share_as_the_run_reserves_them(tiny_checkpoint):
    """The device buffers of the host-attended share (q/k/v sent, outputs returned, two slots) are what the
    planner's sizing says the run reserves, to the byte."""
    from moegen.planner.calibrate import Machine
    from moegen.planner.cost import ModelFacts, setting

    path = tiny_checkpoint("mixtral")
    cfg, weights, _ = load_checkpoint(path)
    machine = Machine(link_h2d_gbps=None, link_d2h_gbps=None, memcpy_gbps=1e6, launch_s=0.0, sync_s=0.0)
    reserved = {}
    for share in (0.0, 0.5):
        rcfg = RuntimeConfig(max_seq_len=16, batch_size=4, kv_block_size=BLOCK, gpu_memory=2**30, cpu_attention=share)
        planned = setting(ModelFacts.of(cfg, weights, torch.float32), rcfg, machine, rcfg.gpu_memory)
        with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg)) as engine:
            assert engine.backend.counters.device_bytes == planned.device_bytes
            reserved[share] = planned.device_bytes
    a = cfg.attention
    per_sequence = (a.num_heads * a.head_dim + 2 * a.num_kv_heads * a.head_dim) + a.num_heads * a.head_dim
    assert reserved[0.5] - reserved[0.0] == 2 * 2 * per_sequence * 4  # two slots of 2 sequences, float32


def test_the_host_worker_runs_with_its_own_thread_count(tiny_checkpoint, monkeypatch):
    """--cpu-attention-threads 1: the host attention runs on one intra-op thread, the rest of the run keeps its own."""
    import moegen.runtime.host_attention.worker as worker

    decode, seen = worker.gqa_decode, []

    def counting(*args):
        seen.append(torch.get_num_threads())
        return decode(*args)

    monkeypatch.setattr(worker, "gqa_decode", counting)
    path = tiny_checkpoint("mixtral")
    cfg, weights, _ = load_checkpoint(path)
    before = torch.get_num_threads()
    rcfg = RuntimeConfig(max_seq_len=16, batch_size=4, kv_block_size=BLOCK, cpu_attention=1.0, cpu_attention_threads=1)
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg)) as engine:
        list(engine.generate(REQUESTS))
    assert seen and set(seen) == {1} and torch.get_num_threads() == before
