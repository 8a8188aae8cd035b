"""A machine without the tracing packages (perfetto, protobuf) or orjson still runs the main job with
tracing off, first-use calibration included: the `moegen` program run in a process where they
can't be imported, its output re-read with the standard library's json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import moegen

ROOT = Path(moegen.__file__).resolve().parent.parent
TRACING = "perfetto,google.protobuf"
OPTIONAL = TRACING + ",orjson"

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


def test_main_job_with_first_calibration_needs_no_tracing_packages_nor_orjson(tiny_checkpoint, tmp_path):
    model, cache = tiny_checkpoint("mixtral"), tmp_path / "cache"  # empty: the planner measures first
    done = moegen_without(OPTIONAL, cache, "generate", model, "--prompt", "hello there", "--max-new-tokens", "3",
                          "--ignore-eos", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "calibrating the cpu device" in done.stderr and "profiling this model's modules" in done.stderr
    assert "moegen: plan: knobs:" in done.stderr
    (record,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert record["prompt"] == "hello there" and len(record["token_ids"]) == 3 and record["finish_reason"] == "length"

    dataset, out, stats = tmp_path / "rows.jsonl", tmp_path / "out.jsonl", tmp_path / "stats.json"
    dataset.write_text("".join(json.dumps({"prompt": f"row {i}"}) + "\n" for i in range(3)) + "{not json\n")
    served = moegen_without(OPTIONAL, cache, "serve-offline", model, "--dataset", dataset, "--output", out,
                            "--max-new-tokens", "2", "--ignore-eos", "--stats-json", stats)
    assert served.returncode == 0, served.stderr[-3000:]
    assert "calibrating" not in served.stderr and "profiling" not in served.stderr  # the cache file read back
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in results if r.get("error") is None) == [0, 1, 2]
    assert [r["id"] for r in results if r.get("error")] == ["line:4"]
    assert json.loads(stats.read_text())["ok"] == 3


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
