"""The device budget holds the launches' transient memory: measured by torch's profiler over every
launch of a budgeted run, the largest step's peak stays within the term the budget reserves for it."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import moegen.runtime.engine as engine_module
from moegen.models.hf_config import generation_eos_ids
from moegen.models.loader import load_checkpoint
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.cpu_backend import CpuBackend
from moegen.runtime.cpu_threads import LANES_ENV
from moegen.runtime.device_memory import WORKSPACE_SHARE, minimum_workspace
from moegen.runtime.engine import Engine
from moegen.runtime.requests import Request
from moegen.trace.memory import MemoryRecorder


def peak_of(prof) -> tuple[int, int]:
    """(the most bytes live at once, those still live at the end) of the allocations a profiled launch made,
    its ops' own allocations and frees in the order they ran."""
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, live


def profiled_backend(monkeypatch, launches: list):
    """make_backend -> a cpu backend that profiles each compute launch's memory: (step, peak, left live)."""
    def make(rcfg, record_intervals=False):
        backend = CpuBackend(budget=rcfg.gpu_memory, link_gbps=rcfg.sim_link_gbps)
        submit = backend.compute.submit

        def measured(fn, label=None, waiting=False, concurrent=False):
            def run():
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    fn()
                launches.append((label.args.get("step") if label else None, *peak_of(prof)))
            return submit(run, label, waiting=waiting, concurrent=concurrent)

        backend.compute.submit = measured
        return backend

    monkeypatch.setattr(engine_module, "make_backend", make)


@pytest.mark.parametrize("budget", ["roomy", "tight"])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_the_budgets_transient_term_holds_the_largest_steps_peak(tiny_checkpoint, monkeypatch, family, budget):
    """Lanes off (one launch at a time, as on a GPU). The first step admits every prompt and fills the step's
    token budget; greedy and sampling sequences side by side. A step's peak: each launch's own peak on top of
    what the launches before it in the step left live (the routing each MoE layer keeps). Under a roomy
    budget launches run whole; under a tight one their workspace is the least they run in, so experts,
    router, MLPs and the lm_head run in pieces and attention micro-batches are cut."""
    monkeypatch.setenv(LANES_ENV, "1")
    launches: list = []
    profiled_backend(monkeypatch, launches)
    path = tiny_checkpoint(family)
    cfg, weights, _ = load_checkpoint(path)
    B, prompt = 8, 56
    rcfg = RuntimeConfig(batch_size=B, attn_micro_batch=4, max_seq_len=64, max_step_tokens=B * prompt)
    least = minimum_workspace(cfg, rcfg)  # a tight budget's workspace share is just that (some experts stream)
    rcfg = dataclasses.replace(rcfg, gpu_memory=2**40 if budget == "roomy" else int(least / WORKSPACE_SHARE))
    requests = [Request([1] + list(range(3 + i, 2 + prompt + i)), 4, ignore_eos=True, temperature=0.5 * (i % 2),
                        seed=i) for i in range(B)]
    recorder = MemoryRecorder()
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg), trace=recorder) as engine:
        list(engine.generate(requests))
        rt = engine.runtime
    assert engine.stats.tokens_per_step[0] == rt.max_step_tokens  # the largest step the budget is sized for
    groups = [s for s in recorder.slices if s.name.endswith("] group")]
    assert groups and max(s.args["tokens"] for s in groups) <= rt.sizes.group_tokens  # grouped within their bound
    by_step = defaultdict(list)
    for step, peak, left in launches:
        by_step[step].append((peak, left))
    peaks = {}
    for step, items in by_step.items():
        held = best = 0
        for peak, left in items:
            best, held = max(best, held + peak), held + left
        peaks[step] = best
    assert len(by_step[0]) > 10 and peaks[0] == max(peaks.values()) > 0
    assert rt.transient_bytes >= peaks[0], (rt.transient_bytes, peaks)
    if budget == "tight":  # the launches ran in pieces
        assert rt.sizes.workspace == least and rt.sizes.expert_tokens < rt.max_step_tokens
        assert rt.sizes.router_tokens < rt.max_step_tokens and len(engine.stats.tokens_per_step) > 1
    assert engine.backend.counters.device_high_water >= rt.transient_bytes  # reserved with the rest


def test_the_lm_head_runs_in_passes_and_samples_the_same_tokens(tiny_checkpoint):
    """With one sequence per pass the sampled ids are those of one pass over all (greedy and drawing rows)."""
    from moegen.runtime.sampling import SamplingParams, sample
    from moegen.runtime.tasks import head_launch

    path = tiny_checkpoint("mixtral")
    cfg, weights, _ = load_checkpoint(path)
    h = torch.randn(6, cfg.hidden_size)
    temperature = torch.tensor([0.0, 0.9, 0.0, 0.7, 0.0, 0.0])
    p = SamplingParams(temperature, torch.zeros(6, dtype=torch.int64), torch.ones(6), torch.arange(6),
                       torch.zeros(6, dtype=torch.int64), greedy_only=False, rows=torch.tensor([1, 3]))
    from moegen.models.reference import lm_head

    whole = sample(lm_head(weights, cfg, h), p)
    for rows in ((1, 1), (4, 1), (6, 6)):
        assert torch.equal(head_launch(weights, cfg, h, p, rows), whole)
    every = SamplingParams(temperature, p.top_k, p.top_p, p.seeds, p.counters, greedy_only=False)
    assert torch.equal(head_launch(weights, cfg, h, every, (1, 2)), sample(lm_head(weights, cfg, h), every))
