#!/usr/bin/env bash
# The cpu compute stream's lanes on and off, side by side: the vs-transformers bench's moegen job
# (serve-offline with no knobs on 256 prompts of 32-128 tokens, 64 new, greedy, EOS ignored) on each
# bench checkpoint, alternating MOEGEN_CPU_LANES=1 and the default, ROUNDS times; prints wall seconds
# from process start and generated tok/s per run, then the median ratio per model.
# Usage: tools/lanes_ab.sh [ROUNDS]   (about 1.5 min per run on 2 cores)
set -euo pipefail
ROUNDS=${1:-2}
setting() {  # setting LANES COMMAND...: run COMMAND with MOEGEN_CPU_LANES=1, or with it unset for "default"
  local lanes=$1; shift
  if [ "$lanes" = default ]; then env -u MOEGEN_CPU_LANES "$@"; else MOEGEN_CPU_LANES=$lanes "$@"; fi
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for model in mixtral deepseek_v2; do
  dir=$(python -c "from moegen.checkpoints.demo import cached_checkpoint; print(cached_checkpoint('$model', 'bench', 'bench'))")
  python - "$dir" "$work/$model.jsonl" <<'PY'
import sys
import orjson
from transformers import AutoTokenizer
from moegen.bench.vs_transformers import bench_prompts
texts = bench_prompts(AutoTokenizer.from_pretrained(sys.argv[1]), 256)
open(sys.argv[2], "wb").write(b"".join(orjson.dumps({"prompt": t}) + b"\n" for t in texts))
PY
  for lanes in 1 default; do  # calibrate each setting once, outside the timed runs
    setting "$lanes" moegen calibrate "$dir" > /dev/null
  done
  for round in $(seq "$ROUNDS"); do
    for lanes in 1 default; do
      start=$(date +%s.%N)
      setting "$lanes" moegen serve-offline "$dir" \
        --dataset "$work/$model.jsonl" --output "$work/out.jsonl" --overwrite --max-new-tokens 64 --ignore-eos \
        2> /dev/null
      end=$(date +%s.%N)
      python -c "print(f'$model lanes=$lanes round $round: {$end - $start:.1f} s, {256 * 64 / ($end - $start):.1f} generated tok/s')"
      echo "$model $lanes $(python -c "print($end - $start)")" >> "$work/times"
    done
  done
done
python - "$work/times" <<'PY'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
for model in dict.fromkeys(r[0] for r in rows):
    off = statistics.median(float(r[2]) for r in rows if r[0] == model and r[1] == "1")
    on = statistics.median(float(r[2]) for r in rows if r[0] == model and r[1] == "default")
    print(f"{model}: lanes off {off:.1f} s, on {on:.1f} s: {off / on:.2f}x")
PY
