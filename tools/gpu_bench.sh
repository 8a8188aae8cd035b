#!/usr/bin/env bash
# The GPU bench on a lent machine (see tools/gpu_bench.py): installs the wheels carried in .whl/
# (orjson, perfetto, viztracer, accelerate: not in the GPU image), then runs it on cuda.
# Run from the repository root:  bash tools/gpu_bench.sh [extra tools.gpu_bench flags]
set -euo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec timeout 480 python3 -m tools.gpu_bench --device cuda "$@"
