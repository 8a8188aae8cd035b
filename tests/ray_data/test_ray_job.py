"""serve-offline --ray and moegen.ray on a local Ray cluster this module starts (2 CPUs), against the
one-process job: the same records by id, every id once, through a killed engine actor and a killed driver.

Oracles: one-process serve-offline's records (itself checked against transformers in tests/io), and
where a greedy completion differs from it, transformers' own greedy run by the parity rule.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moegen.parity import compare_greedy

N_ROWS, NEW_TOKENS = 32, 10
BAD = ['{"prompt": "unterminated', '{"max_tokens": 3}']  # not JSON; no prompt field
SLOW = ["--expert-slots", "1", "--sim-link-gbps", "0.05", "--batch-size", "4"]  # a job long enough to interrupt
RAY = ["--ray", "--engines", "2", "--ray-batch-rows", "4"]
ENGINE_TITLE = b"MapBatches(MoegenEngine)"  # in an engine actor's process title


@pytest.fixture(scope="module")
def cluster():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a private test cluster; its clients (the jobs, this process) too
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    started = subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                              "--node-ip-address=127.0.0.1"], capture_output=True, text=True, env=env, timeout=120)
    assert started.returncode == 0, started.stderr
    yield f"127.0.0.1:{port}"
    subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def job(tiny_checkpoint, tmp_path_factory):
    """(model, dataset, one-process records by id, prompts by id): rows' ids are their places in the file."""
    root = tmp_path_factory.mktemp("ray")
    dataset = root / "rows.jsonl"
    words = ["river", "lamp", "orbit", "maple", "quartz", "harbor", "violin", "ember"]
    good = [{"prompt": f"Tell me about the {words[i % 8]} number {i}, please.", "max_tokens": NEW_TOKENS - i % 3}
            for i in range(N_ROWS)]
    lines_ = [json.dumps(r) for r in good[:5]] + BAD + [json.dumps(r) for r in good[5:]]
    dataset.write_text("\n".join(lines_) + "\n")
    model = tiny_checkpoint("mixtral")
    one = root / "one-process.jsonl"
    done = serve(model, dataset, one, None, "--output-token-ids")
    assert done.returncode == 0, done.stderr
    prompts = {json.dumps(i): json.loads(line) for i, line in enumerate(lines_) if line not in BAD}
    return model, dataset, records(one), prompts


def serve(model, dataset, output, address, *extra, wait=True):
    cmd = [sys.executable, "-m", "moegen.cli", "serve-offline", str(model), "--dataset", str(dataset), "--output",
           str(output), *extra] + ([] if address is None else [*RAY, "--ray-address", address])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def records(path: Path) -> dict:
    """id -> record, asserting no id is written twice."""
    out = {}
    for raw in path.read_bytes().splitlines():
        record = json.loads(raw)
        assert json.dumps(record["id"]) not in out, f"id {record['id']!r} written twice"
        out[json.dumps(record["id"])] = record
    return out


def assert_same_as_one_process(got: dict, one: dict, prompts: dict, model) -> None:
    """Every id once; error records equal; a greedy completion equal to one process's, or where it differs,
    matching transformers' greedy run by the parity rule."""
    assert sorted(got) == sorted(one)
    hf = tok = None
    for key, ours in got.items():
        theirs = one[key]
        if "error" in theirs or ours.get("token_ids") == theirs["token_ids"]:
            assert ours == theirs
            continue
        if hf is None:
            hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
            tok = AutoTokenizer.from_pretrained(str(model))
        ids = tok(prompts[key]["prompt"])["input_ids"]
        out = hf.generate(torch.tensor([ids]), max_new_tokens=len(theirs["token_ids"]), do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
        verdict = compare_greedy(ours["token_ids"], out.sequences[0, len(ids):].tolist(), None,
                                 [step[0] for step in out.logits])
        assert verdict.ok, f"id {key}: {verdict.detail}"


def engine_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if ENGINE_TITLE in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                pass
    return pids


def wait_for(predicate, proc, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the job ended before {what}: {proc.communicate()}"
        time.sleep(0.1)
    raise AssertionError(f"no {what} after {timeout}s")


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_two_engines_give_one_process_results_every_id_once(cluster, job, tmp_path):
    model, dataset, one, prompts = job
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    done = serve(model, dataset, out, cluster, "--output-token-ids", "--stats-json", str(stats))
    assert done.returncode == 0, done.stderr
    got = records(out)
    assert_same_as_one_process(got, one, prompts, model)
    assert sum("error" in r for r in got.values()) == 2  # the two bad lines, as records
    assert "line 6" in got['"line:6"']["error"] and "missing prompt field" in got["6"]["error"]
    summary = json.loads(stats.read_text())
    assert (summary["ok"], summary["failed"], summary["engines"]) == (N_ROWS, 2, 2)
    assert "requests: 32 ok, 2 failed (of 34)" in done.stderr


def test_an_engine_actor_killed_mid_job_is_restarted_and_nothing_is_lost_or_doubled(cluster, job, tmp_path):
    model, dataset, one, prompts = job
    out = tmp_path / "out.jsonl"
    before = engine_pids()
    proc = serve(model, dataset, out, cluster, "--output-token-ids", *SLOW, wait=False)
    wait_for(lambda: engine_pids() - before and 1 <= count_lines(out), proc, "an engine and a first result")
    victims = engine_pids() - before
    victim = min(victims)
    os.kill(victim, signal.SIGKILL)
    assert count_lines(out) < N_ROWS + 2, "the kill was meant to land mid-job"
    wait_for(lambda: engine_pids() - before - {victim} - victims or proc.poll() is not None, proc,
             "a restarted engine actor")
    restarted = engine_pids() - before - victims
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert restarted, "Ray started no new engine actor after the kill"
    assert_same_as_one_process(records(out), one, prompts, model)


def test_the_driver_killed_mid_job_then_resume_completes_it(cluster, job, tmp_path):
    model, dataset, one, prompts = job
    out = tmp_path / "out.jsonl"
    proc = serve(model, dataset, out, cluster, "--output-token-ids", *SLOW, wait=False)
    wait_for(lambda: count_lines(out) >= 4, proc, "4 results")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(records(out))
    assert 4 <= partial < N_ROWS + 2, "the kill was meant to land mid-job"
    resumed = serve(model, dataset, out, cluster, "--output-token-ids", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{partial} already done" in resumed.stderr
    assert_same_as_one_process(records(out), one, prompts, model)


def test_moegen_ray_on_a_dataset_built_here_gives_the_same_rows(cluster, job):
    from moegen.io.prompts import Defaults
    from moegen.ray import MoegenConfig, build_processor
    from moegen.runtime.config import RuntimeConfig

    model, dataset, one, prompts = job
    rows = [{"uid": json.loads(key), "question": row["prompt"], "max_tokens": row["max_tokens"]}
            for key, row in prompts.items()]
    config = MoegenConfig(model, RuntimeConfig(max_seq_len=64), defaults=Defaults(max_new_tokens=NEW_TOKENS),
                          token_ids=True, engines=2, num_cpus=0.5, batch_rows=4)
    processor = build_processor(
        config, preprocess=lambda row: {"id": row["uid"], "prompt": row["question"], "max_tokens": row["max_tokens"]},
        postprocess=lambda row: {"uid": json.loads(row["id"]), "record": row["record"], "text": row["text"]})
    ray.init(address=cluster)
    try:
        out = processor(ray.data.from_items(rows)).take_all()
    finally:
        ray.shutdown()
    got = {json.dumps(r["uid"]): json.loads(r["record"]) for r in out}
    assert len(out) == len(got) == N_ROWS
    assert all(json.loads(r["record"])["text"] == r["text"] for r in out)
    assert_same_as_one_process(got, {k: v for k, v in one.items() if "error" not in v}, prompts, model)
