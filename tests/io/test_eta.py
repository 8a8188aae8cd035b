"""The ETA estimator (`io.eta`), fed a clock and a token stream from a simulated engine: module batching with
B sequences in flight, waiting requests joining as sequences leave (their prompts costing time), each token
ending its sequence early with a chance, steps whose time is fixed or grows with their tokens.

The truth is the simulated job's own end; the estimator sees only what a progress line sees (tokens, the
engine's steps, the caps left in flight, finished requests). Within 20% of the time left (or one step, where
20% is less) once a tenth of the tokens are out.
"""

from __future__ import annotations

import random

import pytest

from moegen.io.eta import Eta, seconds

PROMPT = 64  # tokens per prompt


def simulate(n=256, cap=64, batch=256, p_stop=0.0, step_s=lambda t, n: 0.5, prompt_s=5.0 / (256 * PROMPT),
             fixed=1.0, caps=None, seed=0, every=1.0, prior=None):
    """[(time, generated, estimate, true time left)] at each progress line, every `every` seconds."""
    rng = random.Random(seed)
    caps = caps or [cap] * n
    eta = Eta(n, sum(caps), PROMPT * n, batch, prior_s=prior, fixed=fixed, start=0.0)
    t, waiting, running, generated, log, events = 0.0, list(caps), [], 0, [], []
    while waiting or running:
        t0, decode = t, len(running)
        k = min(batch - decode, len(waiting))
        running += [[0, c] for c in waiting[:k]]
        waiting = waiting[k:]
        t += (step_s(t, decode) if decode else 0.0) + prompt_s * PROMPT * k
        log.append((t - t0, decode, PROMPT * k))
        finished, still = [], []
        for g, c in running:
            generated += 1
            (finished if g + 1 >= c or rng.random() < p_stop else still).append([g + 1, c])
        running = still
        events.append((t, generated, finished, len(log), [c - g for g, c in running], sum(c for _, c in running)))
    end, out, i, seen = t, [], 0, (0, [], 0, [], 0)
    now = every
    while now < end:
        while i < len(events) and events[i][0] <= now:
            seen = events[i][1:]
            for g, c in events[i][2]:
                eta.finished(g, c)
            i += 1
        generated_now, _, steps, left, caps_now = seen
        eta.observe(now, generated_now, log[:steps], left, caps_now)
        out.append((now, generated_now, eta.left(now), end - now))
        now += every
    return out, generated, end


def worst(lines, total, step, since=0.0):
    """The largest error over its tolerance (max(20% of the time left, one step)), once a tenth is out."""
    errors = [abs(est - true) / max(0.2 * true, step) if est is not None else float("inf")
              for now, gen, est, true in lines if gen >= total / 10 and now >= since]
    assert errors
    return max(errors)


CASES = {
    "steady, all in flight": {},
    "steady, waiting requests keep B full": dict(n=1024),
    "slower first steps (warm-up)": dict(step_s=lambda t, n: 1.0 if t < 8 else 0.5),
    "early finishes, all in flight": dict(p_stop=1 / 80),
    "early finishes, waiting requests join": dict(n=1024, p_stop=1 / 40),
    "early finishes and mixed caps": dict(n=1024, p_stop=1 / 60,
                                          caps=[random.Random(1).choice([16, 64, 128]) for _ in range(1024)]),
    "compute-bound steps, early finishes": dict(p_stop=1 / 50, step_s=lambda t, n: 0.05 + 0.004 * n, fixed=0.05),
    "compute-bound steps, waiting requests join": dict(n=1024, p_stop=1 / 40,
                                                       step_s=lambda t, n: 0.05 + 0.004 * n, fixed=0.05),
}


@pytest.mark.parametrize("case", CASES)
def test_within_a_fifth_of_the_time_left(case):
    lines, total, end = simulate(**CASES[case])
    assert worst(lines, total, 0.5) <= 1.0, [(round(t), g, e and round(e, 1), round(tr, 1)) for t, g, e, tr in lines]


def test_a_rate_that_changes_is_followed():
    """Steps twice as slow from 15 s on: no ETA can see that coming, but once the recent half of the run is
    past the change, the estimate holds to it; before, it sits between the old rate and the new."""
    change = 15.0
    lines, total, end = simulate(step_s=lambda t, n: 0.5 if t < change else 1.0)
    first_token = next(t for t, gen, _, _ in lines if gen)
    assert worst(lines, total, 0.5, since=2 * change - first_token + 2) <= 1.0
    mid = [(est, true) for t, _, est, true in lines if change + 2 < t < 2 * change - first_token]
    old_rate_left = [true / 2 for _, true in mid]  # roughly what the old rate would say
    assert all(old * 0.9 <= est <= true * 1.1 for (est, true), old in zip(mid, old_rate_left))


def test_a_mistaken_fixed_share_still_within_bounds_once_steps_vary():
    """Told the steps are half fixed when they are nearly all per token: off while every step is full,
    then the fit from steps of differing sizes takes over at the tail."""
    lines, total, end = simulate(n=1024, p_stop=1 / 40, step_s=lambda t, n: 0.05 + 0.004 * n, fixed=0.5)
    assert worst(lines, total, 0.5, since=0.9 * end) <= 1.0


def test_the_prior_gives_the_first_eta_then_tokens_take_over():
    lines, total, end = simulate(prior=60.0)
    assert lines[0][2] == pytest.approx(59.0)  # the plan's 60 s, one second in
    assert worst(lines, total, 0.5) <= 1.0  # measured once steps are in, not the prior's 60 s


def test_without_steps_tokens_over_their_rate():
    """A Ray job's driver sees finished rows only: the tokens left at the recent rate."""
    eta = Eta(requests=100, caps=100 * 50, start=0.0)
    assert eta.left(5.0) is None  # nothing yet, no prior
    for i in range(1, 31):  # every 6 s, 10 rows finish at 50 tokens each: 83 tok/s
        if i % 6 == 0:
            for _ in range(10):
                eta.finished(50, 50)
        eta.observe(float(i), eta.done_tokens)
    assert eta.left(30.0) == pytest.approx(30.0, rel=0.2)  # 50 rows (2500 tokens) left at 83 tok/s


def test_seconds_format():
    assert [seconds(s) for s in (3.24, 42.4, 185, 7620)] == ["3.2s", "42s", "3m05s", "2h07m"]
