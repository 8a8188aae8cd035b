"""The progress line tells the truth on a real job (plain lines, not a terminal): an ETA on the first line and
within 50% of the time left after; and a plan made from a calibration 3x too slow is said to be off within
the first steps, naming `moegen calibrate` (and one 3x too fast, as slower). A real serve-offline run on a tiny checkpoint, its lines timed
as they are written."""

from __future__ import annotations

import re
import shutil
import time

import pytest

import moegen.io.progress as progress_module
from moegen.io import json_bytes
from tests.io.test_serve_offline import PROMPTS, model_dir, ok, serve, write_jsonl  # noqa: F401

LINE = re.compile(r"^(\d+)/(\d+) requests, (\d+) in flight, .* ETA ([0-9.hms]+)$")


def eta_seconds(text: str) -> float:
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([0-9.]+)s)?", text)
    h, mi, s = (float(x) if x else 0.0 for x in m.groups())
    return h * 3600 + mi * 60 + s


@pytest.fixture
def timed_lines(monkeypatch):
    """(seconds since the job's progress began, message) of every line the progress prints."""
    said = []
    real_say = progress_module.Progress.say

    def say(self, message):
        said.append((time.perf_counter() - self.start, message))
        real_say(self, message)

    monkeypatch.setattr(progress_module, "PLAIN_EVERY_S", 0.25)
    monkeypatch.setattr(progress_module.Progress, "say", say)
    return said


def job(model_dir, tmp_path, n=16, new=64):
    rows = [{"prompt": f"{PROMPTS[i % 3]} {i}", "max_tokens": new} for i in range(n)]
    return write_jsonl(tmp_path / "data.jsonl", rows), tmp_path / "out.jsonl"


def run_timed(model_dir, dataset, out, *extra):
    began = time.perf_counter()
    ok(serve(model_dir, dataset, out, "--ignore-eos", "--batch-size", "16", *extra))
    return time.perf_counter() - began


def test_eta_on_the_first_line_and_within_half_the_time_left(model_dir, tmp_path, timed_lines):
    dataset, out = job(model_dir, tmp_path)
    run_timed(model_dir, dataset, out)
    lines = [(t, LINE.match(m)) for t, m in timed_lines if LINE.match(m)]
    assert lines, timed_lines
    end = lines[-1][0]  # the last line: when the last request finished
    assert lines[0][1].group(1) == "0"  # printed at once, before any result
    for t, m in lines[:-1]:
        left = end - t
        assert abs(eta_seconds(m.group(4)) - left) <= 0.5 * left + 0.3, (t, m.group(0), left, timed_lines)


def scaled(raw, factor):
    """Every measured time of a calibration file's JSON times `factor` (bandwidths divided by it)."""
    if isinstance(raw, dict):
        out = {}
        for k, v in raw.items():
            if k == "points":
                out[k] = [[size, sec * factor] for size, sec in v]
            elif k == "coefficients":
                out[k] = [c * factor for c in v]
            elif k.endswith("_gbps") and v:
                out[k] = v / factor
            elif k in ("launch_s", "sync_s", "copy_cost_s_per_byte"):
                out[k] = v * factor
            elif k == "in_run":  # module type -> seconds a launch takes in a run beyond its time alone
                out[k] = {kind: sec * factor for kind, sec in v.items()}
            elif k == "key":
                out[k] = v
            else:
                out[k] = scaled(v, factor)
        return out
    return raw


@pytest.mark.parametrize("factor,said", [(3.0, "faster"), (1 / 3, "slower")])
def test_a_calibration_3x_off_is_said(model_dir, tmp_path, timed_lines, monkeypatch, factor, said):
    """Every measured time of the cached calibration scaled by `factor`: the run's steps are then about that
    far from the plan's, in the direction the line says (3x too slow a calibration: the run is faster)."""
    from moegen.checkpoints.demo import cache_dir

    dataset, out = job(model_dir, tmp_path)
    run_timed(model_dir, dataset, out)  # the calibration and this model's profile, cached
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir() / "calibration", cache / "calibration")
    for path in (cache / "calibration").glob("*.json"):
        path.write_bytes(json_bytes.dumps(scaled(json_bytes.loads(path.read_bytes()), factor)))
    monkeypatch.setenv("MOEGEN_CACHE", str(cache))
    timed_lines.clear()
    run_timed(model_dir, dataset, tmp_path / "out2.jsonl")
    off = [m for _, m in timed_lines if m.startswith("plan off")]
    assert len(off) == 1, timed_lines  # said once
    assert said in off[0] and "moegen calibrate" in off[0] and str(model_dir) in off[0], off[0]


def test_link_busy_on_the_line_when_weights_stream(model_dir, tmp_path, timed_lines):
    """In the offload regime (experts streamed over a simulated link), the line says how busy the link was;
    with everything on the device, it doesn't."""
    dataset, out = job(model_dir, tmp_path, n=8, new=24)
    run_timed(model_dir, dataset, out, "--gpu-memory", "4MiB", "--sim-link-gbps", "0.5")
    busy = [int(m.group(1)) for _, line in timed_lines if (m := re.search(r", link busy (\d+)%, ", line))]
    assert busy and all(0 <= b <= 100 for b in busy) and max(busy) > 0, timed_lines
    timed_lines.clear()
    run_timed(model_dir, dataset, tmp_path / "out2.jsonl")
    assert not [line for _, line in timed_lines if "link busy" in line], timed_lines


def test_the_main_job_s_plain_lines(tmp_path):
    """`moegen serve-offline --output FILE` (the README's main job: the demo checkpoint, examples/prompts.jsonl)
    with stderr on a pipe: every progress line, the first included, has an ETA within 50% of the time left
    (the end being the first line that counts every request done: a periodic line may land at the end too, its
    ETA then 0), each line timed as it arrives."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    began, lines = time.perf_counter(), []
    proc = subprocess.Popen([sys.executable, "-m", "moegen.cli", "serve-offline", "--output", str(tmp_path / "o.jsonl")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    for raw in proc.stderr:
        if m := LINE.match(raw.strip().removeprefix("moegen: ")):
            lines.append((time.perf_counter() - began, m))
    assert proc.wait(timeout=600) == 0
    assert len(lines) >= 2 and lines[0][1].group(1) == "0" and lines[-1][1].group(1) == lines[-1][1].group(2)
    finished = next(i for i, (_, m) in enumerate(lines) if m.group(1) == m.group(2))
    assert finished >= 1  # the first line comes before the end
    end = lines[finished][0]
    assert all(eta_seconds(m.group(4)) == 0 for _, m in lines[finished:])
    for t, m in lines[:finished]:
        left = end - t
        assert abs(eta_seconds(m.group(4)) - left) <= 0.5 * left, (m.group(0), f"{left:.1f}s left in fact")
