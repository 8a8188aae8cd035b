"""No host syncs inside launches: every op the streams' work items run (compute, its lanes, the copy
streams) is checked as it runs; only the two named reads (router counts, sampled ids) may read
device data, and they run outside the streams, on the event loop."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moegen.runtime.engine as engine_module
from moegen.models.hf_config import generation_eos_ids
from moegen.models.loader import load_checkpoint
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.cpu_backend import CpuBackend
from moegen.runtime.engine import Engine
from moegen.runtime.requests import Request

# Ops that read device data back to the host on a GPU (a count, a value, an output size).
SYNCING = {"nonzero", "_local_scalar_dense", "item", "is_nonzero", "masked_select", "bincount", "unique",
           "_unique2", "repeat_interleave"}


class HostSync(AssertionError):
    pass


class NoSyncs(TorchDispatchMode):
    """Raises on an op that would make the host wait for the device, and on boolean-mask indexing (a
    hidden nonzero)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            raise HostSync(f"{func} inside a launch")
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                raise HostSync(f"boolean indexing ({func}) inside a launch")
        return func(*args, **(kwargs or {}))


def watched_backend(monkeypatch, seen: list):
    """make_backend -> a cpu backend whose device streams run every work item under NoSyncs."""
    def make(rcfg, record_intervals=False):
        backend = CpuBackend(budget=rcfg.gpu_memory, link_gbps=rcfg.sim_link_gbps, record_intervals=record_intervals)
        for stream in (backend.compute, backend.h2d_weights, backend.h2d_kv, backend.d2h):
            submit = stream.submit

            def watched(fn, label=None, waiting=False, concurrent=False, _submit=submit):
                def run():
                    seen.append(1)
                    with NoSyncs():
                        return fn()
                return _submit(run, label, waiting=waiting, concurrent=concurrent)

            stream.submit = watched
        return backend

    monkeypatch.setattr(engine_module, "make_backend", make)


def test_the_watch_catches_each_kind_of_sync():
    x = torch.tensor([0, 2, 2, 1])
    for op in (lambda: torch.bincount(x), lambda: x.nonzero(), lambda: x[x > 0], lambda: int(x.sum()),
               lambda: x.masked_select(x > 0)):
        with pytest.raises(HostSync), NoSyncs():
            op()
    with NoSyncs():  # what the runtime does instead
        torch.zeros(3, dtype=torch.int64).index_add_(0, x, torch.ones_like(x))
        torch.where(x > 0, x, 0)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_launches_and_copies_run_no_host_syncs(tiny_checkpoint, monkeypatch, family):
    """Prefill and decode steps, staged KV and streamed experts (a budget and two expert slots), greedy
    and sampled sequences side by side."""
    seen: list = []
    watched_backend(monkeypatch, seen)
    path = tiny_checkpoint(family)
    cfg, weights, _ = load_checkpoint(path)
    rcfg = RuntimeConfig(batch_size=4, attn_micro_batch=2, max_seq_len=64, gpu_memory=2**40, expert_slots=2)
    requests = [Request([1] + list(range(30 + i, 36 + 3 * i)), 6, temperature=0.8 if i % 2 else 0.0, seed=i)
                for i in range(6)]
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg)) as engine:
        results = list(engine.generate(requests))
    assert len(results) == 6 and len(seen) > 100
