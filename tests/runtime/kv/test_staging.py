"""KV staging from the paged host cache: copies, gathers and scatters that don't grow with B, staging that
overlaps the attention before it, and the same tokens whether or not the device is apart from host memory."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moegen.runtime.engine as engine_module
from moegen.models.hf_config import generation_eos_ids
from moegen.models.loader import load_checkpoint
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.cpu_backend import CpuBackend
from moegen.runtime.engine import Engine
from moegen.runtime.requests import Request


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it (entered around each work item of the streams it watches)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def counting_backend(monkeypatch, counters: dict[str, OpCounter]):
    """make_backend -> a cpu backend whose KV copy streams and host workers run each item under an OpCounter."""
    def make(rcfg, record_intervals=False):
        backend = CpuBackend(budget=rcfg.gpu_memory, link_gbps=rcfg.sim_link_gbps, record_intervals=record_intervals)
        for stream in (backend.h2d_kv, backend.d2h, backend.host_gather, backend.host_scatter):
            counter = counters.setdefault(stream.name, OpCounter())
            submit = stream.submit

            def counted(fn, label=None, waiting=False, concurrent=False, _submit=submit, _counter=counter):
                def run():
                    with _counter:
                        return fn()
                return _submit(run, label, waiting=waiting, concurrent=concurrent)

            stream.submit = counted
        return backend

    monkeypatch.setattr(engine_module, "make_backend", make)


def run_job(path, B: int, new_tokens: int, **knobs):
    cfg, weights, _ = load_checkpoint(path)
    rcfg = RuntimeConfig(batch_size=B, attn_micro_batch=B, max_seq_len=64, gpu_memory=2**40, **knobs)
    requests = [Request([1, 7 + i % 50, 9, 12], new_tokens, ignore_eos=True) for i in range(B)]
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg)) as engine:
        results = {r.id: r.token_ids for r in engine.generate(requests)}
    return engine, results


def test_the_kv_streams_copies_per_step_do_not_grow_with_the_batch(tiny_checkpoint, monkeypatch):
    """One micro-batch per layer: each decode step gathers each layer's blocks in one index_select per KV
    tensor, stages them in one copy, writes its new entries back in one and scatters them into their blocks in
    one index_copy per tensor, at B = 8 as at B = 64 (4-token blocks: 2 to 3 blocks per sequence); a step of
    prompts alone has nothing cached to stage. Counted as the aten ops the streams' work items make."""
    path = tiny_checkpoint("mixtral")
    layers = load_checkpoint(path)[0].num_layers
    copies, host_ops = {}, {}
    for B in (8, 64):
        counters: dict[str, OpCounter] = {}
        counting_backend(monkeypatch, counters)
        engine, _ = run_job(path, B, new_tokens=5, sim_link_gbps=50.0, kv_block_size=4)
        steps = engine.stats.steps
        assert steps == 5  # the prompts, then four decode steps, at either B
        copies[B] = (counters["copy H2D KV"].ops["copy_"], counters["copy D2H"].ops["copy_"])
        # no gathers or scatters on the copy streams: those run on the host workers
        assert not {"index", "index_put", "index_select"} & set(counters["copy H2D KV"].ops), counters
        gathers, scatters = counters["host KV gather"].ops, counters["host KV scatter"].ops
        host_ops[B] = (gathers["index_select"] - 5, scatters["index_copy_"], scatters["index_put_"])  # (5: embeddings)
    # Per step, the KV stream also carries the step's inputs (one copy) and its embedding rows (one).
    assert copies[8] == copies[64] == (4 * layers + 2 * 5, 5 * layers), copies
    assert host_ops[8] == host_ops[64] == (4 * layers * 2, 5 * layers * 2, 0), host_ops  # K and V


def test_staging_the_next_micro_batch_overlaps_the_attention_before_it(tiny_checkpoint, tmp_path, monkeypatch):
    """Four micro-batches per layer, traced, each layer's first attention launch held 50 ms longer:
    micro-batch 1's stage copy starts while micro-batch 0 attends (its staging waits only for the
    previous step's write-backs of its layer and for its own slot; before, it waited for micro-batch
    0's write-back, which comes after 0's attention)."""
    import time

    import moegen.runtime.tasks.attention as attention_tasks
    from moegen.trace.summarize import parse

    attend = attention_tasks._attend

    def slow_first(rt, layer, step, mb, w, kv):
        attend(rt, layer, step, mb, w, kv)
        if mb.index == 0:
            time.sleep(0.05)

    monkeypatch.setattr(attention_tasks, "_attend", slow_first)
    path = tiny_checkpoint("mixtral")
    cfg, weights, _ = load_checkpoint(path)
    rcfg = RuntimeConfig(batch_size=32, attn_micro_batch=8, max_seq_len=256, gpu_memory=2**40, sim_link_gbps=0.05)
    requests = [Request([1] + [(5 * i + j) % 400 + 3 for j in range(120)], 4, ignore_eos=True) for i in range(32)]
    trace = tmp_path / "staging.pftrace"
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg), trace=trace) as engine:
        list(engine.generate(requests))
    slices = parse(trace).slices
    stages = {(s.args["step"], s.args["layer"], s.args["micro_batch"]): s for s in slices
              if s.name.startswith("stage KV")}
    pairs = [(a, stages.get((a.args["step"], a.args["layer"], 1))) for a in slices
             if a.name.startswith("attention[") and a.args["tokens"] == a.args["sequences"] and a.args["micro_batch"] == 0]
    assert len(pairs) == 3 * cfg.num_layers and all(stage is not None for _, stage in pairs)  # 3 decode steps
    assert all(stage.start < attention.end for attention, stage in pairs), [
        (stage.start - attention.end) / 1e6 for attention, stage in pairs]


def test_staged_runs_give_the_tokens_of_unstaged_ones(tiny_checkpoint):
    """Micro-batches of 3 over 8 sequences (blocks reused as sequences finish at different lengths), the
    device apart from host memory (staged copies) or not (the launch reads the gathered buffer in place)."""
    path = tiny_checkpoint("deepseek_v3")
    cfg, weights, _ = load_checkpoint(path)
    requests = [Request([1] + list(range(20 + i, 20 + 3 * i)), 3 + i % 4) for i in range(8)]
    got = {}
    for budget in (None, 2**40):
        rcfg = RuntimeConfig(batch_size=4, attn_micro_batch=3, max_seq_len=64, gpu_memory=budget, kv_block_size=4)
        with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg)) as engine:
            got[budget] = {r.id: r.token_ids for r in engine.generate(requests)}
            assert engine.runtime.stager.copies == (budget is not None)
    assert got[None] == got[2**40]
    assert torch.tensor([len(t) for t in got[None].values()]).sum() > 0
