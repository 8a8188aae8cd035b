#!/usr/bin/env bash
# The GPU check (tools/gpu_check/): preflight, bandwidth, parity, offload, trace, fp8; each stage in its own
# process under its own timeout, one JSON record each in $OUT/records.jsonl, one log $OUT/gpu_check.log,
# a table last. Under 9 minutes on an H200 (the stages' timeouts sum to 510 s: 45 + 35 + 100 + 250 + 40 + 40).
#
#   bash tools/gpu_check.sh --fetch-wheels            # here, before a GPU session: cp312 wheels into .whl/
#   bash tools/gpu_check.sh --prepare                 # here: .gpu_check/ (parity checkpoints, expected tokens)
#   bash tools/gpu_check.sh                           # on the GPU machine, carrying .whl and .gpu_check
#   bash tools/gpu_check.sh --stages parity,5         # a rerun of some stages (by name or number)
#   bash tools/gpu_check.sh --device cpu --dry-run    # toy sizes: the same code paths on a cpu
#
# `--help` lists the options. The wheels in .whl/ (what the GPU image lacks: perfetto, a protobuf new
# enough for it, orjson) are installed into /tmp/site first, when they install on this Python.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

if [ "${1:-}" = --fetch-wheels ]; then  # the versions installed here, which the tests ran with
  mkdir -p .whl
  for name in perfetto protobuf orjson; do
    version=$(python3 -c "from importlib.metadata import version; print(version('$name'))") || exit 1
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$name==$version" || exit 1
  done
  ls -l .whl
  exit 0
fi

export PYTHONUNBUFFERED=1
export GPU_CHECK_PIP_LOG
GPU_CHECK_PIP_LOG=$(mktemp /tmp/gpu_check_pip.XXXXXX)
path="$repo"
wheels=(.whl/*.whl)
if [ -e "${wheels[0]}" ]; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "${wheels[@]}" > "$GPU_CHECK_PIP_LOG" 2>&1; then
    export GPU_CHECK_WHEELS_STATUS=ok GPU_CHECK_WHEELS="${wheels[*]##*/}"
    path="/tmp/site:$repo"
  else  # e.g. cp312 wheels on another Python: run without them (preflight records why)
    export GPU_CHECK_WHEELS_STATUS="pip install failed: $(tail -c 400 "$GPU_CHECK_PIP_LOG" | tr '\n' ' ')"
  fi
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m tools.gpu_check "$@"
