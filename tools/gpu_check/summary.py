"""The offload stage's summing-up record, and the table printed last."""

from __future__ import annotations

import json

from tools.gpu_check import records
from tools.gpu_check.mixtral_shaped import paths
from tools.gpu_check.options import CheckOptions

WORST_FIRST = ("failed", "timeout", "skipped", "ok")


def offload_summary(opts: CheckOptions, parts: list[dict]) -> dict:
    """Stage 4's record: the worst of its parts' statuses, the plan, and each mode's key numbers side by
    side (module-based over model-based decode tokens/s as `speedup`)."""
    by_part = {r["stage"]: r for r in parts}
    status = next(s for s in WORST_FIRST if any(r["status"] == s for r in parts))
    plan_file = paths(opts)[1]  # the plan the mode runs followed (a rerun of one part: an earlier call's)
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    keys = ("batch", "decode_tok_s", "link_bound_tok_s", "weights_bound_tok_s", "of_bound", "bytes_per_step",
            "peak_host_bytes", "max_memory_reserved", "device_high_water", "load_s", "run_s", "kv_bound")
    modes = {mode: {k: by_part[f"offload.{mode}"].get(k) for k in keys} | {"status": by_part[f"offload.{mode}"]["status"]}
             for mode in ("module", "model") if f"offload.{mode}" in by_part}
    tok_s = {m: v.get("decode_tok_s") for m, v in modes.items()}
    speedup = tok_s["module"] / tok_s["model"] if tok_s.get("module") and tok_s.get("model") else None
    record = records.base(opts, "offload", status, sum(r.get("seconds", 0) for r in parts)) | {
        "parts": {r["stage"]: r["status"] for r in parts}, "plan": plan, "modes": modes, "speedup": speedup}
    bad = [f"{r['stage']} {r['status']}: {r.get('error') or r.get('reason')}" for r in parts if r["status"] != "ok"]
    if bad:
        record["error" if status in ("failed", "timeout") else "reason"] = "; ".join(bad)
    layers = f"{plan['layers']} layers, {plan['weight_bytes'] / 2**30:.2f} GiB at {plan['gpu_memory'] / 2**30:.2f} GiB; " if plan else ""
    record["headline"] = layers + ", ".join(
        f"{m} B {v['batch']} {v['decode_tok_s']:.1f} tok/s" for m, v in modes.items() if v.get("decode_tok_s") is not None
    ) + (f": {speedup:.2f}x" if speedup else "")
    return record


def table(rows: list[dict]) -> list[str]:
    """One line per record: stage, status, seconds, its headline (or why it did not pass)."""
    lines = ["", f"{'stage':<16}{'status':<9}{'seconds':>8}  result"]
    for r in rows:
        note = r.get("headline") if r["status"] == "ok" else (r.get("error") or r.get("reason") or r.get("headline"))
        note = (note or "").replace("\n", " ")
        lines.append(f"{r['stage']:<16}{r['status']:<9}{r.get('seconds', 0):>8.1f}  "
                     f"{note[:150] + ('…' if len(note) > 150 else '')}")
    return lines
