"""serve-offline survives `kill -9` and SIGINT: nothing lost, nothing written twice.

The job runs in a real subprocess, slowed by a simulated link (every expert streamed through one
slot) so that it can be interrupted mid-run; the output file is re-read from disk each time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

N_ROWS, NEW_TOKENS = 40, 12
SLOW = ["--expert-slots", "1", "--sim-link-gbps", "0.05", "--batch-size", "4"]


@pytest.fixture(scope="module")
def job(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    dataset = root / "rows.jsonl"
    words = ["river", "lamp", "orbit", "maple", "quartz", "harbor", "violin", "ember", "tundra", "saffron"]
    with open(dataset, "w") as f:
        for i in range(N_ROWS):
            f.write(json.dumps({"prompt": f"Tell me about the {words[i % 10]} number {i}, please."}) + "\n")
    model = tiny_checkpoint("mixtral")
    reference = root / "uninterrupted.jsonl"
    done = serve(model, dataset, reference)
    assert done.returncode == 0, done.stderr
    return model, dataset, lines(reference)


def serve(model, dataset, output, *extra, wait=True):
    cmd = [sys.executable, "-m", "moegen.cli", "serve-offline", str(model), "--dataset", str(dataset), "--output",
           str(output), "--max-new-tokens", str(NEW_TOKENS), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def lines(path: Path) -> dict:
    """id -> record, asserting every complete line parses and no id appears twice."""
    records = {}
    for raw in path.read_bytes().splitlines():
        record = json.loads(raw)
        assert record["id"] not in records, f"id {record['id']} written twice"
        records[record["id"]] = record
    return records


def wait_for_lines(path: Path, count: int, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        assert proc.poll() is None, f"the job ended before writing {count} lines: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError(f"no {count} lines in {path} after {timeout}s")


def test_kill_9_then_resume_loses_and_repeats_nothing(job, tmp_path):
    model, dataset, uninterrupted = job
    out = tmp_path / "out.jsonl"
    proc = serve(model, dataset, out, *SLOW, wait=False)
    wait_for_lines(out, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_bytes()
    before = len(written[: written.rfind(b"\n") + 1].splitlines())
    assert 5 <= before < N_ROWS, "the kill was meant to land mid-run"
    resumed = serve(model, dataset, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{before} already done" in resumed.stderr
    final = lines(out)
    assert sorted(final) == list(range(N_ROWS))  # every id exactly once
    assert final == uninterrupted  # greedy: the same completions as a run never interrupted


def test_sigint_drains_then_resume_completes(job, tmp_path):
    model, dataset, uninterrupted = job
    out = tmp_path / "out.jsonl"
    proc = serve(model, dataset, out, *SLOW, wait=False)
    wait_for_lines(out, 3, proc)
    seen = out.read_bytes().count(b"\n")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "admitting no new prompts" in stderr and "--resume" in stderr
    drained = lines(out)
    assert seen <= len(drained) <= seen + 4 + 4  # the in-flight ones (B = 4) finished, nothing new admitted
    assert len(drained) < N_ROWS
    assert all(drained[i] == uninterrupted[i] for i in drained)  # drained results are whole and right
    resumed = serve(model, dataset, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert lines(out) == uninterrupted


def test_second_sigint_stops_at_once_with_a_valid_file(job, tmp_path):
    model, dataset, uninterrupted = job
    out = tmp_path / "out.jsonl"
    proc = serve(model, dataset, out, *SLOW, wait=False)
    wait_for_lines(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr
    stopped = lines(out)
    assert all(stopped[i] == uninterrupted[i] for i in stopped)
