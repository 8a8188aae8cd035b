"""tools/gpu_check.sh on the cpu: the whole dry run, and the runner's handling of a stage that fails
and one that hangs. The records are checked against what is on disk (the checkpoint re-read with
moegen's loader, the trace re-parsed) and against each other, not against captured values."""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moegen.formats import fp8 as blockfp8
from moegen.models.loader import load_checkpoint
from moegen.trace.summarize import parse
from tests.fp8_oracle import dequantize_by_hand
from tools.gpu_check import fp8 as fp8_stage
from tools.gpu_check.scaled_mm import emulated, quantize_rows
from tools.gpu_check.sizing import Budget, DRY, choose, scheduled_steps
from tools.gpu_check.stages import resolve

REPO = Path(__file__).resolve().parents[2]
STAGES = ("preflight", "bandwidth", "parity", "offload.write", "offload.module", "offload.model", "offload", "trace", "fp8")


def check(tmp: Path, *args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    """Run the check (cpu, dry run) into `tmp`; (the process, the records by stage)."""
    done = subprocess.run(["bash", "tools/gpu_check.sh", "--device", "cpu", "--dry-run", "--out", str(tmp / "out"),
                           "--work", str(tmp / "work"), "--prepared", str(tmp / "prepared"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = (tmp / "out" / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    by_stage = {r["stage"]: r for r in records}
    assert len(by_stage) == len(records), "one record per stage"
    return done, by_stage


def test_dry_run_writes_one_ok_record_per_stage_with_its_numbers(tmp_path):
    done, records = check(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert tuple(records) == STAGES
    for r in records.values():
        assert r["status"] == "ok", r
        assert r["device"] == "cpu" and r["dry_run"] is True and r["seconds"] > 0
        assert r["versions"]["torch"] == torch.__version__
    files = sorted(p.name for p in (tmp_path / "out").iterdir())  # what comes back: 8 files of 16 MiB at most
    assert files == ["gpu_check.log", "offload-module.pftrace", "records.jsonl"]
    assert all(p.stat().st_size < 16 * 2**20 for p in (tmp_path / "out").iterdir())
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert all(f" {name} (timeout" in log for name in STAGES if name != "offload")
    assert "stage           status" in done.stdout  # the table, last

    bw = records["bandwidth"]
    assert "host memcpy" in bw["what"] and bw["h2d_gbps"] > 0 and bw["small_copy_us"] > 0
    assert math.isclose(bw["small_copy_gbps"], bw["small_copy_bytes"] / (bw["small_copy_us"] * 1e3), rel_tol=1e-6)

    rows = records["parity"]["rows"]
    assert {(r["family"], r["dtype"]) for r in rows} == {(f, d) for f in ("mixtral", "qwen3_moe", "deepseek_v3")
                                                         for d in ("float32", "bfloat16")}
    assert len(rows) == 24
    for r in rows:
        assert r["equal"] + len(r["divergences"]) == r["of"] == 5
        assert r["accepted"] == all(d["gap"] is not None and d["gap"] < r["tolerance"] for d in r["divergences"])
        if r["dtype"] == "float32":
            assert r["equal"] == 5 and r["accepted"]  # tolerance 0: every token as the reference's
    beyond = [r for r in rows if not r["accepted"]]  # bfloat16 only: reported, not failed
    assert len(records["parity"]["bf16_beyond"]) == len(beyond) and records["parity"]["failures"] == []

    write = records["offload.write"]
    plan = write["plan"]
    cfg, weights, report = load_checkpoint(Path(write["model_dir"]), torch.bfloat16)  # re-read from disk
    assert cfg.num_layers == write["layers"] == plan["layers"] and cfg.hidden_size == DRY.hidden
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in report.loaded
    stored = 0
    for path in report.files:  # every tensor in the shards, from their headers
        with safe_open(str(path), framework="pt") as f:
            stored += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert 2 * stored == write["weight_bytes"] and len(report.files) == write["layers"] + 1

    module, model = records["offload.module"], records["offload.model"]
    assert module["batch"] == plan["batch"] > model["batch"] == plan["model_batch"]
    assert model["kv_bound"] and not module["kv_bound"]
    for run in (module, model):
        moved = run["bytes_per_step"]["h2d"] + run["bytes_per_step"]["d2h"]
        assert run["decode_steps"] > 0 and run["decode_tok_s"] > 0 and run["decode_sequences"] == run["batch"]
        assert math.isclose(run["link_bound_tok_s"], run["batch"] * run["link_gbps"] * 1e9 / moved, rel_tol=1e-6)
        # each full-batch decode step streams every streamed module once (prefetch may shift a copy
        # across a step's edge)
        assert run["bytes_per_step"]["h2d_weight"] == pytest.approx(run["knobs"]["streamed_bytes"], rel=0.1)
        assert 0 < run["device_high_water"] <= run["gpu_memory"] and run["peak_host_bytes"] > 0
    summary = records["offload"]
    assert summary["speedup"] == pytest.approx(module["decode_tok_s"] / model["decode_tok_s"])

    trace = records["trace"]
    kept = Path(trace["trace"])
    assert kept.parent == tmp_path / "out" and kept.stat().st_size == trace["trace_bytes"]
    steps = [s for s in parse(kept).slices if s.track == "event loop"]
    assert len(steps) == trace["steps"] == 2  # --trace-steps, dry run default
    assert all(s.args["phase"] == "decode" and s.args["sequences"] == module["batch"] for s in steps)
    assert trace["misplaced"] == 0 and trace["summary"]["streams"]

    f8 = records["fp8"]
    assert f8["tokens"] == [128, 1024, 8192] and f8["dtype"] == "float32" and f8["copy_gbps"] > 0
    assert f8["block_scaled_gemm"].startswith("unsupported: --device cpu") and f8["probe"]
    assert all(said for said in f8["probe"].values())  # what torch raised on the cpu, word for word
    for shape in f8["shapes"].values():
        H, I = shape["hidden"], shape["width"]  # 3 linears of H x I: FP8 read + float32 written, a scale a block
        assert shape["dequant_bytes"] == 3 * H * I * (1 + 4) + 3 * (H // 128) * (I // 128) * 4
        assert shape["dequant_gbps"] == pytest.approx(shape["dequant_bytes"] / shape["dequant_s"] / 1e9)
        assert [r["tokens"] for r in shape["rows"]] == f8["tokens"]
        for r in shape["rows"]:
            assert r["launch_s"] > 0 and r["swiglu_s"] > 0 and r["act_quant_s"] > 0
            assert 0 < r["dequant_share"] < 1
            assert 0.005 < r["recipe_error"] < 0.2  # e4m3 activations: a few percent, never float32 noise
            assert r["fp8_gemm_s"] is None and r["fp8_error"] is None
    assert any(line.startswith("fp8 ") and "dequant GB/s" in line for line in done.stdout.splitlines())  # the table


@pytest.mark.parametrize("forced", ["--force-fail", "--force-hang"])
def test_a_failed_or_hung_stage_is_recorded_and_the_next_still_runs(tmp_path, forced):
    started = time.monotonic()
    done, records = check(tmp_path, "--stages", "1,2", forced, "preflight", "--timeout", "preflight=4", timeout=120)
    assert done.returncode == 1  # not every stage passed
    first, second = records["preflight"], records["bandwidth"]
    if forced == "--force-fail":
        assert first["status"] == "failed" and "forced failure" in first["error"]
    else:  # killed at its timeout: the runner wrote its record
        assert first["status"] == "timeout" and "4 s timeout" in first["error"]
        assert 4 <= first["seconds"] < 4 + 3 + 5  # the timeout, the kill's grace, start-up
    assert second["status"] == "ok" and second["h2d_gbps"] > 0
    assert time.monotonic() - started < 60


def test_stages_resolve_by_name_number_and_part():
    assert resolve("1,offload") == ("preflight", "offload.write", "offload.module", "offload.model")
    assert resolve("4.2,trace") == ("offload.module", "trace")
    with pytest.raises(ValueError, match="unknown 7"):
        resolve("7")


def test_scheduled_steps_count_admission_and_the_whole_job():
    # 4 prompts of 4 tokens, 2 new each, 8 tokens a step, by hand: step 0 admits p0 and p1 (8 tokens);
    # step 1: their 2 decode tokens + p2 (6), then p0 and p1 finish; step 2: p2's token + p3 (5), all
    # admitted, p2 finishes; step 3: p3's last token.
    assert scheduled_steps(4, 4, 2, 8) == (3, 4)


def test_sizing_shrinks_the_model_to_fit_host_memory_and_time():
    roomy = Budget(device="cpu", link_gbps=1.0, link_source="test", host_available=2**40, disk_free=2**40,
                   disk_in_memory=False, write_s=1e6, module_s=1e6, model_s=1e6, write_gbps=1.0, load_gbps=1.0)
    big = choose(DRY, 8, roomy, 12 * 2**20, 32, 8)
    assert big.layers == 8 and big.fits and big.batch == 2 * big.model_batch
    small_host = replace(roomy, host_available=int(0.75 * big.weight_bytes / 0.85))
    tight = choose(DRY, 8, small_host, 12 * 2**20, 32, 8)
    assert tight.fits and tight.layers < 8 and tight.host_bytes == tight.weight_bytes - _outside_arena(tight) + tight.host_kv_bytes
    assert tight.host_bytes <= tight.host_limit
    in_ram = choose(DRY, 8, replace(roomy, host_available=int(1.5 * big.weight_bytes / 0.85), disk_in_memory=True),
                    12 * 2**20, 32, 8)  # room for the weights and KV once, but a tmpfs work dir holds them twice
    assert in_ram.fits and in_ram.layers < 8 and in_ram.host_bytes + in_ram.weight_bytes <= in_ram.host_limit
    # 1 MB/s to disk and time for half of the 8 layers' bytes
    slow_disk = replace(roomy, write_gbps=1e-3, write_s=big.weight_bytes / 1e6 / 2 / 0.8)
    slow = choose(DRY, 8, slow_disk, 12 * 2**20, 32, 8)
    assert slow.fits and 2 <= slow.layers <= 4 and slow.estimate_s["write"] <= slow.limits_s["write"]
    # cuda: host buffers are page-locked at their exact sizes, so the host holds what it does on cpu
    on_cuda = choose(DRY, 8, replace(roomy, device="cuda"), 12 * 2**20, 32, 8)
    assert on_cuda.host_bytes == on_cuda.weight_bytes - _outside_arena(on_cuda) + on_cuda.host_kv_bytes


def _outside_arena(plan) -> int:
    """Bytes of the tensors that are not in the host arena: embedding, lm_head, norms and routers."""
    H, V, L = DRY.hidden, DRY.vocab, plan.layers
    return 2 * (2 * V * H + H + L * (2 * H + 8 * H))


def test_fp8_activation_blocks_and_the_emulated_gemm_match_the_format_by_hand():
    x = torch.randn(4, 256) * torch.tensor([1.0, 1e-3]).repeat_interleave(128)  # [T, K]: two very different blocks
    x[1, 128:] = 0  # an all-zero block: scale 1, zeros
    q, scale = quantize_rows(x)
    assert scale.shape == (4, 2) and scale.stride() == (1, 4)  # column-major, as the GEMM reads it
    amax = x.abs().view(4, 2, 128).amax(-1)
    assert torch.equal(scale, torch.where(amax > 0, amax / 448, torch.ones_like(amax)))
    back = q.float() * scale.repeat_interleave(128, 1)
    # e4m3: 3 mantissa bits (half a step: 2^-4 relative), subnormals 2^-9 of the scale apart
    assert ((back - x).abs() <= x.abs() / 16 + scale.repeat_interleave(128, 1) * 2**-10).all()
    w = blockfp8.quantize(torch.randn(256, 256))
    want = back @ dequantize_by_hand(w.data, w.scale).t()
    torch.testing.assert_close(emulated(q, scale, w, torch.float32), want, rtol=1e-5, atol=1e-5)


def test_fp8_gpu_branch_with_the_emulated_gemm_and_every_verdict():
    # the rows a cuda run fills, here through the exact emulation of the recipe: its error is the recipe's
    shape = fp8_stage._shape(256, 128, torch.device("cpu"), torch.float32, fp8_stage.timer("cpu"), emulated, 10.0)
    for r in shape["rows"]:
        assert r["fp8_error"] == r["recipe_error"] > fp8_stage.TOLERANCE and r["fp8_failed"] is None
        assert r["fp8_speedup"] == pytest.approx(r["launch_s"] / r["fp8_gemm_s"])
    assert fp8_stage._verdict(None, emulated, {}, {"s": shape}) == "not equal"
    assert "FP8 GEMM" in fp8_stage._headline({"s": shape}, 10.0, "not equal")

    def rows(*speedups, error=1e-3, failed=None):
        return {"s": {"rows": [{"tokens": 128, "fp8_error": error, "fp8_speedup": s, "fp8_failed": failed}
                               for s in speedups]}}

    assert fp8_stage._verdict(None, emulated, {}, rows(1.5, 1.2)) == "faster and equal"
    assert fp8_stage._verdict(None, emulated, {}, rows(1.5, 0.9)) == "slower"
    assert fp8_stage._verdict(None, emulated, {}, rows(None, failed="RuntimeError: CUBLAS\nmore")) == \
        "unsupported: s T=128: RuntimeError: CUBLAS"
    assert fp8_stage._verdict(None, None, {"torch._scaled_mm": "ValueError: Invalid\nmore"}, {}) == \
        "unsupported: torch._scaled_mm: ValueError: Invalid"
    assert fp8_stage._verdict("no GPU", None, {}, {}) == "unsupported: no GPU"
