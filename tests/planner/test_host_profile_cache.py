"""The host attention profile is measured with the threads the run gives its host worker, and again for others."""

from __future__ import annotations

from moegen.models.loader import load_checkpoint
from moegen.planner import host_profile, plan
from moegen.planner.calibrate import Calibration, Linear
from moegen.planner.profile import signature
from moegen.runtime.config import RuntimeConfig
from tests.planner.test_planner import MACHINE, flat_profile


def test_host_attention_is_measured_again_for_other_threads(tiny_checkpoint, monkeypatch):
    cfg, weights, _ = load_checkpoint(tiny_checkpoint("olmoe"))
    rcfg = RuntimeConfig()
    cal = Calibration({}, MACHINE, {signature(cfg, rcfg.dtype, weights): flat_profile()})
    measured, saved = [], []
    monkeypatch.setattr(plan, "calibrated", lambda *a, **k: cal)
    monkeypatch.setattr(plan, "save", saved.append)
    monkeypatch.setattr(host_profile, "measure_host_attention",
                        lambda cfg, dtype, threads: measured.append(threads) or Linear([1e-3 * threads, 0, 0]))

    for threads in (1, 1, 2, 2, None):
        _, profile = plan.calibration_for(cfg, weights, RuntimeConfig(cpu_attention_threads=threads))
    default = plan.torch_threads()
    assert measured == [1, 2] + ([default] if default != 2 else [])  # once per thread count, cached between
    assert profile.host_attn_threads == default and len(saved) == len(measured)
