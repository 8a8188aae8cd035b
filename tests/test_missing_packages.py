"""A machine without the tracing packages (perfetto, protobuf) still runs the main job with tracing
off, first-use calibration included: the `moegen` program run in a process where they can't be
imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import moegen

ROOT = Path(moegen.__file__).resolve().parent.parent
TRACING = "perfetto,google.protobuf"

# The program with some packages made unimportable, as if not installed: `import` raises
# ModuleNotFoundError and importlib.util.find_spec answers None.
WITHOUT = """
import sys
for name in sys.argv.pop(1).split(","):
    sys.modules[name] = None
from moegen.cli import run
sys.argv[0] = "moegen"
run()
"""


def moegen_without(packages: str, cache: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MOEGEN_CACHE=str(cache),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", WITHOUT, packages, *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


def test_generate_with_first_calibration_needs_no_tracing_packages(tiny_checkpoint, tmp_path):
    cache = tmp_path / "cache"  # empty: the planner calibrates the device and profiles the model first
    done = moegen_without(TRACING, cache, "generate", tiny_checkpoint("mixtral"), "--prompt", "hello there",
                          "--max-new-tokens", "3", "--ignore-eos")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "calibrating the cpu device" in done.stderr and "profiling this model's modules" in done.stderr
    assert "moegen: plan: knobs:" in done.stderr
    assert list((cache / "calibration").glob("cpu-*.json"))
    assert done.stdout.startswith("[0] 'hello there' -> ") and "(3 tokens, length)" in done.stdout


def test_trace_without_perfetto_fails_at_start_naming_the_fix(tiny_checkpoint, tmp_path):
    cache = tmp_path / "cache"
    trace = tmp_path / "run.pftrace"
    done = moegen_without(TRACING, cache, "generate", tiny_checkpoint("mixtral"), "--prompt", "hello",
                          "--max-new-tokens", "2", "--trace", trace)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "--trace" in done.stderr and "pip install perfetto protobuf" in done.stderr
    assert not cache.exists() and not trace.exists()  # before calibrating, loading or writing anything
    summary = moegen_without(TRACING, cache, "trace", "summarize", trace)
    assert summary.returncode == 1 and "Traceback" not in summary.stderr
    assert "moegen trace summarize" in summary.stderr and "pip install perfetto protobuf" in summary.stderr
