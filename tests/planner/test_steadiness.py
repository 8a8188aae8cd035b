"""Calibration is cached only when measured steadily: a measurement's repeats that disagree (a busy thread beside
it) keep the result out of the cache, said once; the machine's load is recorded beside what is cached."""

from __future__ import annotations

import bisect
import os
import random
import threading
import time

import pytest
import torch

from moegen.io import json_bytes
from moegen.planner import calibrate
from moegen.planner.steadiness import MAX_SPREAD, Steadiness, measuring, record


def test_spread_is_the_typical_measurement_s_disagreement():
    with measuring() as outer:
        record([1.0, 1.0, 1.0])
        with measuring() as inner:
            record([1.0, 2.0, 3.0])  # median 2 over best 1
            record([2.0, 2.2, 2.1])
        record([1.0, 1.1, 1.05])
    assert inner.spread == pytest.approx((1.0 + 0.05) / 2) and inner.measurements == 2
    assert outer.measurements == 4 and outer.spread == pytest.approx((0.05 + 0.05) / 2)
    assert not inner.steady and outer.steady


def test_save_keeps_out_what_was_measured_unsteadily(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_CACHE", str(tmp_path))
    cal = calibrate.calibrated("cpu")  # measured here (an empty cache) or not: its machine part is what it is
    cal.profiles = {"steady": _profile(), "busy": _profile()}
    cal.steadiness = {"machine": Steadiness(0.02, 0.3, 7), "steady": Steadiness(0.05, 0.3, 40),
                      "busy": Steadiness(MAX_SPREAD * 2, 1.4, 40)}
    path = calibrate.save(cal)
    raw = json_bytes.loads(path.read_bytes())
    assert set(raw["profiles"]) == {"steady"} and set(raw["steadiness"]) == {"machine", "steady"}
    assert raw["steadiness"]["steady"]["load"] == 0.3  # the load recorded beside it
    assert set(calibrate.load("cpu").profiles) == {"steady"}
    cal.steadiness["machine"] = Steadiness(MAX_SPREAD * 2, 1.4, 7)
    path.unlink()
    assert calibrate.save(cal) is None and not path.exists()  # an unsteady machine part: nothing at all


def _profile():
    curve = calibrate.Curve([(1, 1e-4), (64, 1e-3)])
    line = calibrate.Linear([1e-5, 1e-6, 1e-9])
    return calibrate.Profile(expert=curve, mlps={}, router=curve, attn_decode=line, attn_prefill=line, head=curve,
                             combine=curve)


class Busy:
    """Threads beside the calibration, two per core, all busy (20-150 ms at random) or all idle (5-30 ms) by turns,
    one schedule for all: busy is matmuls and copies (the cores) and Python (the interpreter lock), so most
    repeats of a measurement run beside them and a few alone."""

    def __enter__(self):
        rng, t, self.switches = random.Random(0), 0.0, []
        while t < 600:
            t += rng.uniform(0.02, 0.15) if len(self.switches) % 2 == 0 else rng.uniform(0.005, 0.03)
            self.switches.append(t)
        self.stop, self.began = threading.Event(), time.perf_counter()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(2 * (os.cpu_count() or 1))]
        for thread in self.threads:
            thread.start()
        return self

    def _run(self, i):
        a, src, dst = torch.randn(512, 512), torch.ones(2**23), torch.empty(2**23)  # matmuls and 32 MiB copies
        while not self.stop.is_set():
            now = time.perf_counter() - self.began
            spell = bisect.bisect(self.switches, now)
            if spell % 2:
                time.sleep(self.switches[spell] - now)
            elif i % 2:
                a @ a
                dst.copy_(src)
            else:
                sum(range(20000))  # holds the interpreter lock

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join()


def matmul_machine(device: str) -> calibrate.Machine:
    """A calibration's machine part from real `timed` measurements: matmuls of the sizes an expert runs at."""
    w = torch.randn(1024, 1024)
    seconds = [calibrate.timed(lambda x=torch.randn(t, 1024): x @ w, device, budget_s=0.3)
               for t in (64, 128, 256, 512, 1024)]
    return calibrate.Machine(None, None, memcpy_gbps=1 / seconds[0], launch_s=seconds[1], sync_s=seconds[2])


def test_a_busy_thread_keeps_the_calibration_out_of_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "measure_machine", matmul_machine)
    said = []
    with Busy():
        cal = calibrate.calibrated("cpu", say=said.append)
    found = cal.steadiness["machine"]
    assert not found.steady, found
    assert calibrate.load("cpu") is None  # nothing cached
    (note,) = [s for s in said if "not cached" in s]
    assert f"{found.spread:.0%}" in note and "moegen calibrate" in note and "load" in note

    said.clear()
    cal = calibrate.calibrated("cpu", say=said.append)  # quiet now: measured again, and cached
    assert cal.steadiness["machine"].steady, cal.steadiness
    cached = calibrate.load("cpu")
    assert cached is not None and cached.steadiness["machine"].measurements == 5
    assert not [s for s in said if "not cached" in s]
