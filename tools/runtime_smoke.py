"""Runtime smoke check on a device: greedy tokens of the runtime vs the reference model on the CPU.

    python tools/runtime_smoke.py [--device cuda] [--out results.json]

For two families (Mixtral-like GQA, DeepSeek-V3-like MLA), tiny random checkpoints, float32 (TF32
off), the runtime runs with several knob sets (defaults; 1 expert slot; a budget that forces
offload; model batching) and every completion must equal the reference model's (run on the CPU,
the oracle of the runtime, itself checked against transformers by the test suite). Prints a
table last. Made to be the first thing a session with a lent GPU runs (`--device cuda`); with
`--device cpu` it is the same check on the cpu backend.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

KNOBS = {
    "defaults": {},
    "1 expert slot": {"expert_slots": 1},
    "offload budget": {"gpu_memory": "auto"},
    "model batching": {"batching": "model", "expert_slots": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    from moegen.checkpoints.make import make_model
    from moegen.models.hf_config import generation_eos_ids
    from moegen.models.loader import load_checkpoint
    from moegen.models.reference import ReferenceModel
    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request

    prompts = [[1, 5, 9, 12], [1] + list(range(300, 340)), [1, 42], [1, 7, 7, 7, 100, 200], [1, 3]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("mixtral", "deepseek_v3"):
            path = make_model(Path(tmp) / family, family, "tiny", seed=1).path
            cfg, weights, _ = load_checkpoint(path)
            eos = generation_eos_ids(path, cfg)
            want = [g.token_ids for g in ReferenceModel(cfg, weights).generate(prompts, 16, eos)]
            module_bytes = None
            for name, knobs in KNOBS.items():
                knobs = dict(knobs)
                if knobs.get("gpu_memory") == "auto":
                    knobs["gpu_memory"] = module_bytes
                rcfg = RuntimeConfig(device=args.device, max_seq_len=64, batch_size=3, **knobs)
                start = time.perf_counter()
                with Engine(cfg, weights, rcfg, eos) as engine:
                    got = {r.id: r.token_ids for r in engine.generate([Request(p, 16) for p in prompts])}
                    c = engine.backend.counters
                    if module_bytes is None:  # room for the core, staging and a quarter of the modules
                        blocks = engine.runtime.placement.blocks.values()
                        module_bytes = c.device_high_water - 3 * sum(b.nbytes for b in blocks) // 4
                    rows.append({"family": family, "knobs": name, "equal": sum(got[i] == w for i, w in enumerate(want)),
                                 "of": len(want), "seconds": time.perf_counter() - start, "h2d_weight_bytes":
                                 c.h2d_weight_bytes, "device_high_water": c.device_high_water,
                                 "budget": engine.backend.budget})
            trace = Path(tmp) / f"{family}.pftrace"  # device timings in the trace (cuda: timing events)
            rcfg = RuntimeConfig(device=args.device, max_seq_len=64, batch_size=3, expert_slots=2)
            with Engine(cfg, weights, rcfg, eos, trace=trace) as engine:
                list(engine.generate([Request(p, 16) for p in prompts]))
            rows[-1]["traced_slices"] = _traced_slices(trace)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"{'family':<13}{'knobs':<16}{'tokens equal':>13}{'weights H2D':>14}{'high water':>13}{'s':>7}")
    for r in rows:
        print(f"{r['family']:<13}{r['knobs']:<16}{str(r['equal']) + '/' + str(r['of']):>13}"
              f"{r['h2d_weight_bytes'] / 2**20:>11.2f}MiB{r['device_high_water'] / 2**20:>10.2f}MiB{r['seconds']:>7.2f}")
    traced = {r["family"]: r["traced_slices"] for r in rows if "traced_slices" in r}
    print("traced run, slices per stream:", traced)
    if any(r["equal"] != r["of"] for r in rows):
        raise SystemExit("runtime tokens differ from the reference model's")
    if any(not n.get("compute stream") or not n.get("copy H2D weights stream") for n in traced.values()):
        raise SystemExit("the traced run has no compute or weight-copy slices")


def _traced_slices(path: Path) -> dict[str, int]:
    """Slices per stream track of a trace, each checked to lie within the run (well-aligned clocks)."""
    from moegen.trace.summarize import parse

    parsed = parse(path)
    steps = [s for s in parsed.slices if s.track == "event loop"]
    first, last = min(s.start for s in steps), max(s.end for s in steps)
    counts: dict[str, int] = {}
    for s in parsed.slices:
        if s.track.endswith("stream"):
            if not (first - 1e9 <= s.start <= s.end <= last + 1e9):
                raise SystemExit(f"slice {s.name} on {s.track} lies outside the run: clocks misaligned")
            counts[s.track] = counts.get(s.track, 0) + 1
    return counts


if __name__ == "__main__":
    main()
