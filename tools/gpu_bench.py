"""The GPU bench: everything a lent GPU should measure, in one command, in under 8 minutes.

    bash tools/gpu_bench.sh                                # on the GPU machine
    python -m tools.gpu_bench --device cpu --dry-run       # here: the same code paths on a small model

1. Parity on the device: tools/runtime_smoke (two families, float32, TF32 off, every knob set).
2. Pinned host->device bandwidth (1 GiB, best of 5).
3. A Mixtral-8x7B-shaped model (hidden 4096, 8 experts of 14336, top-2; bfloat16, random weights
   built in memory, shared between experts: speed does not depend on their values) with enough
   layers to be at least twice --gpu-memory; prompt 512, decode 32. Module-based against
   model-based batching under the same budget; decode tokens/s from each run's trace against the
   link bound B × link GB/s / offloaded bytes. The module run's trace is kept.
4. transformers + accelerate offload (`max_memory` at the same budget) on the same shapes, behind a
   time guard, when accelerate is importable; otherwise recorded as skipped, with the reason.

Writes benchmarks/results/gpu_bench-<device>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
# (hidden, expert width, heads, kv heads, vocab): Mixtral-8x7B, and a small stand-in for --dry-run.
SHAPES = {"full": (4096, 14336, 32, 8, 32000), "dry": (256, 896, 8, 2, 32000)}


def pinned_h2d_gbps(device: str, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device == "cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def mixtral_shaped(workdir: Path, layers: int, shape: str):
    """(model dir with config.json, ModelConfig, random ModelWeights in bfloat16) of a Mixtral-shaped model."""
    from moegen.checkpoints.specs import config_json
    from moegen.models.hf_config import load_model_config
    from moegen.models.weights import GQAWeights, LayerWeights, MLPWeights, ModelWeights, MoEWeights, RouterWeights

    H, I, N, G, V = SHAPES[shape]
    config = config_json("mixtral", "bench", V, 1, 2) | {"hidden_size": H, "intermediate_size": I,
                                                         "num_hidden_layers": layers, "num_attention_heads": N,
                                                         "num_key_value_heads": G}
    (workdir / "config.json").write_text(json.dumps(config))
    cfg = load_model_config(workdir)
    D = H // N

    def r(*shape_):
        return torch.empty(shape_, dtype=torch.bfloat16).uniform_(-0.02, 0.02)

    attn = GQAWeights(r(N * D, H), r(G * D, H), r(G * D, H), r(H, N * D))
    expert = (r(I, H), r(I, H), r(H, I))
    norm = torch.ones(H, dtype=torch.bfloat16)
    weights = ModelWeights(
        embed_tokens=r(V, H), norm=norm, lm_head=r(V, H),
        layers=[LayerWeights(input_layernorm=norm, attn=GQAWeights(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj),
                             post_attention_layernorm=norm,
                             moe=MoEWeights(RouterWeights(r(8, H)), [MLPWeights(*expert) for _ in range(8)]), mlp=None)
                for _ in range(layers)])
    return cfg, weights


def run_mode(cfg, weights, mode: str, device: str, budget: int, batch: int, prompt: int, decode: int,
             trace: Path) -> dict:
    from moegen.bench.offload import decode_numbers
    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request

    rcfg = RuntimeConfig(device=device, dtype="bfloat16", batch_size=batch, gpu_memory=budget,
                         max_seq_len=prompt + decode, batching=mode, attn_micro_batch=min(batch, 64),
                         max_step_tokens=batch * prompt + prompt + decode)  # every prompt in one step: then
    # each decode step runs at full batch, the steps decode_numbers measures
    start = time.perf_counter()
    with Engine(cfg, weights, rcfg, (2,), trace=trace) as engine:
        B = engine.runtime.batch_size
        prompts = [[1] + [(7 * i + j) % 31000 + 3 for j in range(prompt - 1)] for i in range(B)]
        list(engine.generate([Request(p, decode, ignore_eos=True) for p in prompts]))
        placement = engine.runtime.placement
        streamed = sum(b.nbytes for m, b in placement.blocks.items() if placement.streamed(m))
        high_water = engine.backend.counters.device_high_water
    return decode_numbers(trace) | {"mode": mode, "batch": B, "streamed_bytes": streamed,
                                    "device_high_water": high_water, "seconds": time.perf_counter() - start}


def accelerate_decode(cfg_dir: Path, device: str, budget: int, batch: int, prompt: int, decode: int,
                      guard_s: float) -> dict:
    """transformers + accelerate offload on the same shapes (random init), decode tokens/s; skipped with
    the reason when accelerate is missing or the run would exceed the guard."""
    try:
        import accelerate  # noqa: F401
        from accelerate import dispatch_model, infer_auto_device_map
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        return {"skipped": f"accelerate not importable: {exc}"}
    config = AutoConfig.from_pretrained(cfg_dir)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if device == "cuda":
        device_map = infer_auto_device_map(model, max_memory={0: budget, "cpu": 10**13})
        model = dispatch_model(model, device_map=device_map)
    first = "cuda:0" if device == "cuda" else "cpu"
    ids = torch.randint(3, 31000, (batch, prompt), device=first)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        prefill_s = time.perf_counter() - t0
        if prefill_s * decode > guard_s:
            return {"skipped": f"one step took {prefill_s:.1f}s; {decode} would pass the {guard_s:.0f}s guard",
                    "prefill_s": prefill_s}
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=decode, min_new_tokens=decode, do_sample=False, pad_token_id=0)
        total = time.perf_counter() - t0
    return {"batch": batch, "decode_tok_s": batch * (decode - 1) / max(total - prefill_s, 1e-9),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry-run", action="store_true", help="a small model (for checking the script on cpu)")
    parser.add_argument("--gpu-memory", default="24GiB")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--hf-guard-s", type=float, default=120)
    args = parser.parse_args()
    from moegen.units import parse_bytes

    torch.backends.cuda.matmul.allow_tf32 = False
    out: dict = {"device": args.device, "torch": torch.__version__, "dry_run": args.dry_run,
                 "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    import subprocess
    import sys
    smoke = subprocess.run([sys.executable, "tools/runtime_smoke.py", "--device", args.device, "--out",
                            str(RESULTS / f"smoke-{args.device}.json")], capture_output=True, text=True)
    out["parity"] = {"ok": smoke.returncode == 0, "table": smoke.stdout.strip().splitlines()[-12:],
                     "seconds": time.perf_counter() - t0}
    out["pinned_h2d_gbps"] = pinned_h2d_gbps(args.device, 2**30 if not args.dry_run else 2**26)

    budget = parse_bytes(args.gpu_memory) if not args.dry_run else 64 * 2**20
    shape = "dry" if args.dry_run else "full"
    H, I, N, G, V = SHAPES[shape]
    layer_bytes = 2 * (8 * 3 * H * I + 2 * H * H + 2 * H * (H // N) * G)
    layers = max(2, -(-2 * budget // layer_bytes))  # at least twice the budget
    batch, prompt, decode = (args.batch, args.prompt, args.decode) if not args.dry_run else (64, 32, 8)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, weights = mixtral_shaped(Path(tmp), layers, shape)
        out["model"] = {"layers": layers, "bytes": layers * layer_bytes + 2 * 2 * V * H, "budget": budget}
        trace = RESULTS / f"gpu_bench-{args.device}-module.pftrace"
        out["module"] = run_mode(cfg, weights, "module", args.device, budget, batch, prompt, decode, trace)
        out["model_based"] = run_mode(cfg, weights, "model", args.device, budget, batch, prompt, decode,
                                      Path(tmp) / "model.pftrace")
        try:
            out["transformers_accelerate"] = accelerate_decode(Path(tmp), args.device, budget, min(batch, 64), prompt,
                                                               decode, args.hf_guard_s)
        except Exception as exc:  # the peer failing must not lose our own numbers
            out["transformers_accelerate"] = {"skipped": f"{type(exc).__name__}: {exc}"}
    link = out["pinned_h2d_gbps"]
    for key in ("module", "model_based"):
        run = out[key]
        run["link_bound_tok_s"] = run["batch"] * link * 1e9 / run["streamed_bytes"] if run["streamed_bytes"] else None
    out["seconds"] = time.perf_counter() - t0
    path = RESULTS / f"gpu_bench-{args.device}{'-dry' if args.dry_run else ''}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"parity on {args.device}: {'ok' if out['parity']['ok'] else 'FAILED'}; pinned H2D {link:.1f} GB/s; "
          f"model {layers} layers, {out['model']['bytes'] / 2**30:.1f} GiB, budget {budget / 2**30:.2f} GiB")
    print(f"{'run':<26}{'batch':>7}{'decode tok/s':>14}{'link bound':>12}{'link busy':>11}")
    for key in ("module", "model_based"):
        run = out[key]
        print(f"{key:<26}{run['batch']:>7}{run['decode_tok_s']:>14.1f}{run['link_bound_tok_s'] or 0:>12.1f}"
              f"{100 * run['link_busy']:>10.0f}%")
    hf = out["transformers_accelerate"]
    print(f"{'transformers + accelerate':<26}" + (f"{hf['batch']:>7}{hf['decode_tok_s']:>14.1f}" if "decode_tok_s"
                                                    in hf else f"  skipped: {hf['skipped']}"))
    print(f"wrote {path} ({out['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
