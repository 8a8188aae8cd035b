"""Host memory: each large host buffer allocated once at its exact size and page-locked by one backend
call; a second engine on the same weights reuses the first's weight arena."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from safetensors import safe_open

import moegen.runtime.engine as engine_module
from moegen.models.hf_config import generation_eos_ids
from moegen.models.loader import load_checkpoint
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.cpu_backend import CpuBackend
from moegen.runtime.engine import Engine
from moegen.runtime.requests import Request

PROMPTS = [[1, 5, 9, 12], [1] + list(range(300, 330)), [1, 42]]
# Tensors that are not part of a streamable module's host block (they live on the device, or the
# embedding in host memory of its own).
CORE = re.compile(r"embed_tokens|lm_head|layernorm|model\.norm|\.gate\.weight$|e_score_correction_bias")


class RecordingBackend(CpuBackend):
    """The cpu backend, recording every page-lock and unlock it is asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.locks: list[tuple[int, int, str]] = []  # (address, bytes, what)
        self.unlocks: list[int] = []

    def _page_lock(self, buffer, nbytes, what):
        self.locks.append((buffer.data_ptr(), nbytes, what))

    def _page_unlock(self, buffer):
        self.unlocks.append(buffer.data_ptr())


def checkpoint_bytes(path: Path, keep, element_size: int) -> int:
    """Elements of the checkpoint's tensors whose names `keep` accepts, read from the files, times a size."""
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if keep(name):
                    total += _numel(f.get_slice(name).get_shape())
    return total * element_size


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_one_page_lock_per_arena_of_exactly_its_bytes_and_none_left_after_close(tiny_checkpoint, monkeypatch):
    path = tiny_checkpoint("mixtral")
    made: list[RecordingBackend] = []

    def recording(rcfg, record_intervals=False):
        made.append(RecordingBackend(budget=rcfg.gpu_memory, link_gbps=rcfg.sim_link_gbps))
        return made[0]

    monkeypatch.setattr(engine_module, "make_backend", recording)
    cfg, weights, _ = load_checkpoint(path)
    B, S = 4, 64
    # bfloat16 on a CPU without native bf16: the cpu backend reorders no weights for it, so every streamable
    # module has a host block.
    monkeypatch.setattr("moegen.models.linear.native_bf16", lambda: False)
    rcfg = RuntimeConfig(dtype="bfloat16", batch_size=B, max_seq_len=S, gpu_memory=2**40)
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg)) as engine:
        list(engine.generate([Request(p, 4) for p in PROMPTS]))
        backend = made[0]
        locks = {what: nbytes for _, nbytes, what in backend.locks}
        assert [what for _, _, what in backend.locks].count("the weight arena") == 1
        assert [what for _, _, what in backend.locks].count("the host KV cache") == 1
        a = cfg.attention
        assert locks["the host KV cache"] == B * S * cfg.num_layers * 2 * a.num_kv_heads * a.head_dim * 2
        assert locks["the weight arena"] == checkpoint_bytes(path, lambda n: not CORE.search(n), 2)
        # The weight blocks lie in the locked arena.
        arena = next((address, n) for address, n, what in backend.locks if what == "the weight arena")
        for block in engine.runtime.placement.blocks.values():
            start = block.flat.data_ptr()
            assert arena[0] <= start and start + block.nbytes <= arena[0] + arena[1]
    assert sorted(backend.unlocks) == sorted(address for address, _, _ in backend.locks)
    assert not backend.locked


REUSE = textwrap.dedent("""
    import json, sys
    from moegen.models.loader import load_checkpoint
    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request

    def peak() -> int:  # VmHWM, bytes
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    cfg, weights, _ = load_checkpoint(sys.argv[1])
    rcfg = RuntimeConfig(batch_size=128, max_seq_len=256, gpu_memory=2**40, resident_experts=12, sim_link_gbps=50.0)
    requests = [Request([1] + [(7 * i + j) % 900 + 3 for j in range(40)], 4, ignore_eos=True) for i in range(128)]
    peaks, spans = [peak()], []
    for _ in range(2):
        with Engine(cfg, weights, rcfg, ()) as engine:
            list(engine.generate(requests))
            blocks = [b for b in engine.runtime.placement.blocks.values() if b.flat is not None]
            assert any(not engine.runtime.placement.streamed(m) for m in engine.runtime.placement.blocks)
            spans.append([(b.flat.data_ptr(), b.nbytes) for b in blocks])
            kv_bytes = sum(t.numel() * t.element_size() for kv in engine.runtime.kv for t in (kv.k, kv.v))
        peaks.append(peak())
    print(json.dumps({"peaks": peaks, "spans": spans, "kv_bytes": kv_bytes,
                      "arena_bytes": sum(n for _, n in spans[0])}))
""")


def test_a_second_engine_on_the_same_weights_reuses_the_first_ones_arena(tmp_path):
    """A budgeted `small` checkpoint with 12 of its 24 experts resident (float32: residents are reordered for oneDNN and have no host block;
    the streamed experts do). Peak RSS is read in a fresh process: this one's is already high."""
    from moegen.checkpoints.make import make_model

    path = make_model(tmp_path / "small", "mixtral", "small", seed=1).path  # 24 experts: half stream
    out = subprocess.run([sys.executable, "-c", REUSE, str(path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    first, second = got["spans"]
    assert first and sorted(second) == sorted(first)  # the same blocks, where the first engine packed them
    before, after_first, after_second = got["peaks"]
    raised = after_first - before
    assert raised > got["arena_bytes"] + got["kv_bytes"] // 2, got  # the first engine's arena and KV show
    assert after_second - after_first < raised / 5, got


def test_a_loaded_tensor_is_freed_as_soon_as_its_module_is_packed(tiny_checkpoint, monkeypatch):
    """The host holds the model once: while later modules are still being packed into the arena, the first
    expert's loaded tensor (no longer referenced by the weights) is already gone."""
    import gc
    import weakref

    import moegen.runtime.host_blocks as host_blocks

    path = tiny_checkpoint("mixtral")
    cfg, weights, _ = load_checkpoint(path)
    loaded = weakref.ref(weights.layers[0].moe.experts[0].gate_proj)
    pack, freed = host_blocks.pack, []

    def watched(*args):
        block = pack(*args)
        gc.collect()
        freed.append(loaded() is None)
        return block

    monkeypatch.setattr(host_blocks, "pack", watched)
    rcfg = RuntimeConfig(max_seq_len=32, gpu_memory=2**40, resident_experts=0)  # experts packed into the arena
    with Engine(cfg, weights, rcfg, generation_eos_ids(path, cfg)):
        pass
    assert len(freed) > 2 and freed[-2], freed  # freed before the last module was packed
