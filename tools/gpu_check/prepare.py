"""Before a GPU session, on the CPU: the parity stage's checkpoints and what they must generate.

    bash tools/gpu_check.sh --prepare        # writes .gpu_check/ (git-ignored; the session carries it)

For each family, a tiny random checkpoint (byte-level BPE tokenizer: nothing from mistral-common,
which the GPU image lacks) and, from moegen's reference model on the CPU in float32 (the runtime's
oracle, itself checked against transformers by the test suite), the greedy tokens of PROMPTS and
the logits at every generated position.

The bfloat16 tolerance is measured here too: the runtime's own bfloat16 run on the cpu backend
diverges from the float32 tokens where rounding flips a near-tie, of tokens or (in an MoE) of
expert choices, whose effect on the logits can be large. The gap at a divergence is the reference's
|logit of its token - logit of ours| / max|logit| there; the device's bfloat16 run may diverge
only at gaps below BF16_SLACK × the largest the cpu's bfloat16 run showed, and never below
BF16_FLOOR (both recorded with the data).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3")
PROMPTS = [[1, 5, 9, 12], [1] + list(range(300, 340)), [1, 42], [1, 7, 7, 7, 100, 200], [1, 3]]
NEW_TOKENS = 16
MANIFEST = "manifest.json"
BF16_FLOOR = 0.02  # bfloat16 keeps 8 bits: ~0.4% per rounding, a few roundings deep
BF16_SLACK = 2.0  # another device's kernels round differently: room for twice the cpu's worst


def prepare(prepared: Path, say=print) -> dict:
    """Write the checkpoints, expected tokens and logits under `prepared`; return the manifest."""
    from moegen.checkpoints.make import make_model
    from moegen.models.hf_config import generation_eos_ids
    from moegen.models.loader import load_checkpoint
    from moegen.models.reference import ReferenceModel

    started = time.perf_counter()
    for family in FAMILIES:
        path = make_model(prepared / "parity" / family, family, "tiny", seed=1, overwrite=True).path
        cfg, weights, _ = load_checkpoint(path)
        eos = generation_eos_ids(path, cfg)
        gens = ReferenceModel(cfg, weights).generate(PROMPTS, NEW_TOKENS, eos, keep_logits=True)
        tokens, logits = [g.token_ids for g in gens], [g.logits for g in gens]
        gaps = [d["gap"] for d in divergences(_cpu_bf16(cfg, weights, eos), tokens, logits) if d["gap"] is not None]
        tolerance = max(BF16_FLOOR, BF16_SLACK * max(gaps, default=0.0))
        (prepared / "parity" / f"{family}.expected.json").write_text(json.dumps(
            {"eos": list(eos), "tokens": tokens, "bf16_cpu_gaps": gaps, "bf16_tolerance": tolerance}))
        save_file({str(i): torch.stack(g.logits).contiguous() for i, g in enumerate(gens)},
                  str(prepared / "parity" / f"{family}.logits.safetensors"))
        say(f"prepared {family}: {sum(map(len, tokens))} expected tokens; the cpu's bfloat16 run diverged at "
            f"gaps {[round(g, 4) for g in gaps]}: bfloat16 tolerance {tolerance:.4f}")
    manifest = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "commit": _commit(),
                "families": list(FAMILIES), "prompts": PROMPTS, "new_tokens": NEW_TOKENS, "dtype": "float32",
                "oracle": "moegen.models.reference.ReferenceModel on the CPU"}
    (prepared / MANIFEST).write_text(json.dumps(manifest, indent=1))
    say(f"prepared parity data in {prepared} ({time.perf_counter() - started:.1f} s)")
    return manifest


@dataclass(slots=True)
class Expected:
    """What a family's runtime run must generate."""

    tokens: list[list[int]]  # greedy ids per prompt (float32 reference)
    logits: list[list[Tensor]]  # the reference's [V] logits per generated position, per prompt
    eos: tuple[int, ...]
    bf16_tolerance: float  # largest reference gap at which a bfloat16 divergence is accepted


def expected(prepared: Path, family: str) -> Expected:
    raw = json.loads((prepared / "parity" / f"{family}.expected.json").read_text())
    logits = load_file(str(prepared / "parity" / f"{family}.logits.safetensors"))
    return Expected(raw["tokens"], [list(logits[str(i)]) for i in range(len(raw["tokens"]))], tuple(raw["eos"]),
                    raw["bf16_tolerance"])


def divergences(got: list[list[int]], want: list[list[int]], logits: list[list[Tensor]]) -> list[dict]:
    """Each prompt's first divergence from the reference: prompt, position, both tokens, the gap."""
    from moegen.parity import compare_greedy

    found = []
    for i, (ours, oracle) in enumerate(zip(got, want)):
        r = compare_greedy(ours, oracle, None, logits[i], tie_tol=0.0)
        if r.divergence is not None:
            at = r.divergence
            found.append({"prompt": i, "position": at, "ours": ours[at] if at < len(ours) else None,
                          "oracle": oracle[at] if at < len(oracle) else None,
                          "gap": r.gap})  # None: one ended where the other went on (no gap to weigh)
    return found


def _cpu_bf16(cfg, weights, eos: tuple[int, ...]) -> list[list[int]]:
    """The runtime's tokens in bfloat16 on the cpu backend (defaults)."""
    from moegen.runtime.config import RuntimeConfig
    from moegen.runtime.engine import Engine
    from moegen.runtime.requests import Request

    rcfg = RuntimeConfig(device="cpu", dtype="bfloat16", max_seq_len=64, batch_size=3)
    with Engine(cfg, weights, rcfg, eos) as engine:
        got = {r.id: r.token_ids for r in engine.generate([Request(p, NEW_TOKENS) for p in PROMPTS])}
    return [got[i] for i in range(len(PROMPTS))]


def manifest(prepared: Path) -> dict | None:
    path = prepared / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
    except OSError:
        return None
    return out.stdout.strip() or None
