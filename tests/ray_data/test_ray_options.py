"""What --ray takes of a cluster (`moegen.ray.cluster.share`, from the resources Ray reports) and what it refuses."""

from __future__ import annotations

import pytest
import ray

from moegen.ray.cluster import Share, share


@pytest.mark.parametrize("resources, engines, expected", [
    ({"CPU": 2.0}, 1, Share(1.0, 0.0, 2)),  # a core left for Ray's reading; both cores' threads once it's done
    ({"CPU": 2.0}, 2, Share(0.5, 0.0, 1)),  # fractions: two engines and Ray's tasks on 2 cores
    ({"CPU": 64.0, "GPU": 8.0}, 8, Share(7.0, 1.0, 7)),  # a GPU each, the CPUs beside it less one
])
def test_each_engine_gets_its_share(monkeypatch, resources, engines, expected):
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    assert share(engines) == expected


def test_more_engines_than_gpus_is_refused_naming_the_flag(monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 32.0, "GPU": 2.0})
    with pytest.raises(ValueError, match="--engines 3: the cluster has 2 GPUs"):
        share(3)


def test_trace_with_ray_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    from moegen.cli import main

    dataset = tmp_path / "rows.jsonl"
    dataset.write_text('{"prompt": "hi"}\n')
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, ["serve-offline", str(tiny_checkpoint("mixtral")), "--dataset", str(dataset),
                                       "--output", str(out), "--ray", "--trace", str(tmp_path / "t.pftrace")])
    assert result.exit_code == 2 and "--trace records one process's engine" in result.output
    assert not out.exists()
