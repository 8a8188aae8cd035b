"""What `serve-offline --ray --engines 1` costs over plain serve-offline on the same job, side by side.

    python tools/ray_overhead.py [--model DIR] [--dataset FILE] [--repeats 2]

Runs, alternately and `--repeats` times each: plain serve-offline; --ray with no address (a local
cluster moegen starts and stops: what a laptop user pays); --ray on a cluster already running (started
before the run, untimed: what a cluster user pays per job). Prints each run's wall time and generated
tok/s, and the ratios of the medians. Every run writes a fresh output; greedy results must match.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint [default: the demo one]")
    ap.add_argument("--dataset", type=Path, default=ROOT / "examples" / "prompts.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    kinds = ["plain", "--ray (local cluster started)", "--ray (cluster running)"]
    seen: dict[str, list] = {k: [] for k in kinds}
    texts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for kind in kinds:
                flags = [] if kind == "plain" else ["--ray"]
                address = _start_cluster(env) if kind.endswith("running)") else None  # not timed
                try:
                    flags += ["--ray-address", address] if address else []
                    out, stats = Path(tmp) / f"{r}-{kinds.index(kind)}.jsonl", Path(tmp) / "stats.json"
                    cmd = [sys.executable, "-m", "moegen.cli", "serve-offline",
                           *([str(args.model)] if args.model else []), "--dataset", str(args.dataset), "--output",
                           str(out), "--max-new-tokens", str(args.max_new_tokens), "--stats-json", str(stats),
                           "--overwrite", *flags]
                    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
                finally:
                    if address:
                        subprocess.run(["ray", "stop", "--force"], capture_output=True, env=env)
                if done.returncode != 0:
                    sys.exit(f"{kind} failed:\n{done.stderr[-3000:]}")
                s = json.loads(stats.read_text())
                seen[kind].append(s["wall_s"])
                texts[kind] = {json.loads(line)["id"]: json.loads(line).get("text") for line in out.open()}
                print(f"{kind:32s} run {r}: {s['wall_s']:.1f}s wall, {s['generated_tokens']} generated tokens, "
                      f"{s['generated_tokens'] / s['wall_s']:.1f} tok/s over the wall time", flush=True)
    plain = statistics.median(seen["plain"])
    for kind in kinds:
        wall = statistics.median(seen[kind])
        same = texts[kind] == texts["plain"]
        print(f"median {kind:32s} {wall:.1f}s  ({wall / plain:.2f}x plain, +{wall - plain:.1f}s); "
              f"results {'identical to' if same else 'DIFFERENT from'} plain")


def _start_cluster(env: dict) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(["ray", "start", "--head", f"--port={port}", "--include-dashboard=false",
                    "--node-ip-address=127.0.0.1"], check=True, capture_output=True, env=env)
    return f"127.0.0.1:{port}"


if __name__ == "__main__":
    main()
