"""An engine stream: requests submitted while it runs, from several threads, into one batch."""

from __future__ import annotations

import threading

import pytest

from moegen.runtime.requests import Request
from tests.runtime.test_runtime_behaviour import PROMPTS, engine_for, run

CALLERS = [[Request(p, 6 + i, id=f"c{c}-{i}", temperature=0.8 * (c % 2), seed=c * 10 + i)
            for i, p in enumerate(PROMPTS)] for c in range(3)]


def test_callers_on_threads_get_their_own_results_equal_to_one_run(tiny_checkpoint):
    """Three callers submit at once from their own threads into a batch of 4: each gets back exactly its
    own ids, with the tokens a plain run of all the requests gives (sampling is counted per request)."""
    path = tiny_checkpoint("mixtral")
    whole = run(path, [r for caller in CALLERS for r in caller], batch_size=4)[0]
    got: dict[int, dict] = {}
    with engine_for(path, batch_size=4) as engine, engine.stream() as stream:
        def call(c):
            got[c] = {r.id: r.token_ids for r in stream.submit(CALLERS[c])}

        threads = [threading.Thread(target=call, args=(c,)) for c in range(len(CALLERS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert max(engine.stats.sequences_per_step) == 4  # the callers' sequences shared the batch
    for c, caller in enumerate(CALLERS):
        assert got[c] == {r.id: whole[r.id] for r in caller}


def test_an_idle_stream_waits_for_more_and_a_late_caller_fills_the_batch(tiny_checkpoint):
    """A caller that arrives after the run went idle is served by the same run; one arriving while another
    is down to its last sequence joins that sequence's steps."""
    path = tiny_checkpoint("qwen3_moe")
    long = Request(PROMPTS[0], 30, id="long")
    with engine_for(path, batch_size=4) as engine, engine.stream() as stream:
        first = list(stream.submit([Request(PROMPTS[1], 3, id="early")]))
        steps = engine.stats.steps
        results = stream.submit([long])  # submitted now; read below
        got = []
        late = threading.Thread(target=lambda: got.extend(stream.submit([Request(p, 4) for p in PROMPTS[2:]])))
        late.start()
        got += list(results)
        late.join()
        assert engine.stats.steps > steps  # the same run took the later callers
        assert max(engine.stats.sequences_per_step[steps:]) > 1  # the late caller joined the long one's steps
    assert [r.id for r in first] == ["early"]
    assert sorted(str(r.id) for r in got) == ["0", "1", "2", "long"]  # a request without an id: its index
    assert {r.id: r.token_ids for r in got if r.id == "long"} == run(path, [long])[0]


def test_a_request_too_long_is_refused_before_the_run_takes_it(tiny_checkpoint):
    with engine_for(tiny_checkpoint("mixtral")) as engine, engine.stream() as stream:
        with pytest.raises(ValueError, match="exceed --max-seq-len 64"):
            list(stream.submit([Request(PROMPTS[0], 100, id="big")]))
        assert [r.id for r in stream.submit([Request(PROMPTS[0], 2, id="ok")])] == ["ok"]


def test_a_failing_run_reaches_every_waiting_caller(tiny_checkpoint, monkeypatch):
    def explode(*args):
        raise RuntimeError("expert launch failed on purpose")

    monkeypatch.setattr("moegen.runtime.tasks.moe._run_expert", explode)
    monkeypatch.setattr("moegen.runtime.tasks.expert_groups.group_launch", explode)
    errors = []
    with engine_for(tiny_checkpoint("mixtral")) as engine:
        stream = engine.stream()

        def call():
            try:
                list(stream.submit([Request(p, 4) for p in PROMPTS]))
            except RuntimeError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        stream.close()
    assert errors == ["expert launch failed on purpose"] * 2
