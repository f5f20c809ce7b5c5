"""Reward functions score hand-worked examples; specs resolve to built-ins, modules and files
with clear errors; RewardRunner turns every failure into a status and a count, never raising."""

from __future__ import annotations

import collections
import itertools
import math
import os
import signal
import threading
import time

import numpy as np
import pytest

from async_pmd.data import make_task
from async_pmd.rewards import (
    BUILTIN_REWARDS,
    RewardRunner,
    add_mod10_reward,
    exact_match,
    gsm_tiny_reward,
    load_reward_fn,
    math_reward,
    overlong_penalty,
    reverse_reward,
    synthetic_reward,
)

# --- built-in rewards ------------------------------------------------------------------------


def test_exact_match_strips_whitespace_only():
    assert exact_match("", " 42\n", "42", {}) == 1.0
    assert exact_match("", "42.0", "42", {}) == 0.0


def test_add_mod10_is_exact():
    """The digit and nothing else; the EOS text is removed only when extra names it."""
    assert add_mod10_reward("3+4=", "7", "7", {}) == 1.0
    assert add_mod10_reward("3+4=", "7 ", "7", {}) == 0.0
    assert add_mod10_reward("3+4=", "77", "7", {}) == 0.0
    assert add_mod10_reward("3+4=", "7<eos>", "7", {}) == 0.0
    assert add_mod10_reward("3+4=", "7<eos>", "7", {"eos_token": "<eos>"}) == 1.0


@pytest.mark.parametrize(
    "response, score",
    [
        ("cba", 1.0),  # 3 of 3
        ("cb", 2 / 3),  # c,b right; the missing third position counts as wrong
        ("cbaa", 3 / 4),  # 3 right over the longer length 4
        ("abc", 1 / 3),  # only the middle b lines up
        ("", 0.0),
        ("xyz", 0.0),
    ],
)
def test_reverse_partial_credit(response, score):
    result = reverse_reward("rev abc=", response, "cba", {})
    assert result["score"] == pytest.approx(score)
    assert result["exact"] == float(response == "cba")


def test_synthetic_dispatches_on_the_task():
    assert synthetic_reward("3+4=", "7", "7", {"task": "add_mod10"}) == 1.0
    assert synthetic_reward("rev ab=", "b", "ba", {"task": "reverse"})["score"] == 0.5
    with pytest.raises(KeyError):
        synthetic_reward("", "", "", {})


@pytest.mark.parametrize(
    "response, truth, score",
    [
        ("\\boxed{7}", "7", 1.0),
        ("7", "7", 1.0),
        ("so the answer is $\\frac{1}{2}$", "0.5", 1.0),
        ("#### 72", "72", 1.0),
        ("\\boxed{8}", "7", 0.0),
        ("no idea", "7", 0.0),
    ],
)
def test_math_reward(response, truth, score):
    assert math_reward("", response, truth, {}) == score


def test_gsm_tiny_reward_on_its_own_answers():
    problems = make_task("gsm_tiny", "val", size=5)
    for p in problems:
        assert gsm_tiny_reward(p.text, p.answer, p.answer, p.extra) == 1.0
        assert gsm_tiny_reward(p.text, f"it is {p.answer}", p.answer, p.extra) == 1.0
        assert gsm_tiny_reward(p.text, str(int(p.answer) + 1), p.answer, p.extra) == 0.0


def test_add_mod10_chance_level_is_one_tenth():
    """A policy that always answers one digit scores 0.1 on train, whichever digit it is."""
    prompts = make_task("add_mod10", "train")
    for digit in "0123456789":
        mean = np.mean([add_mod10_reward(p.text, digit, p.answer, p.extra) for p in prompts])
        assert mean == pytest.approx(0.1)


# --- spec loading ----------------------------------------------------------------------------


REWARD_FILE = """
def score(prompt, response, ground_truth, extra):
    return float(len(response) == len(ground_truth))

NOT_A_FUNCTION = 3

def too_few(response):
    return 0.0
"""


def test_builtin_and_module_specs():
    assert load_reward_fn("math") is BUILTIN_REWARDS["math"]
    assert load_reward_fn("async_pmd.rewards.builtin:exact_match") is exact_match


def test_file_spec(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_FILE)
    fn = load_reward_fn(f"{path}:score")
    assert fn("", "abc", "xyz", {}) == 1.0 and fn("", "ab", "xyz", {}) == 0.0


def test_spec_errors(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(REWARD_FILE)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_reward_fn(f"{tmp_path / 'nope.py'}:score")
    with pytest.raises(AttributeError, match="has no attribute 'missing'"):
        load_reward_fn(f"{path}:missing")
    with pytest.raises(TypeError, match="not a function"):
        load_reward_fn(f"{path}:NOT_A_FUNCTION")
    with pytest.raises(TypeError, match="must accept"):
        load_reward_fn(f"{path}:too_few")
    with pytest.raises(ImportError, match="cannot import module"):
        load_reward_fn("no_such_package_xyz.rewards:score")
    with pytest.raises(ValueError, match="not a built-in"):
        load_reward_fn("nonexistent_reward")


# --- RewardRunner ----------------------------------------------------------------------------


def misbehaving(prompt, response, ground_truth, extra):
    """Each response names a behaviour (run in the runner's worker processes)."""
    if response == "raise":
        raise ZeroDivisionError("boom")
    if response == "hang":  # a sleep, as a slow network call would
        time.sleep(30)
        return 1.0
    if response == "spin":  # pure-Python CPU loop, as sympy on a pathological answer
        while True:
            pass
    if response == "hang_in_c":  # a call the timer signal cannot reach (it is blocked)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(30)
    if response == "crash":
        os._exit(3)
    return {
        "ok": 1.0,
        "nan": math.nan,
        "inf": math.inf,
        "str": "1.0",
        "none": None,
        "dict": {"score": 0.5, "acc": True, "pred": "x"},
        "nodict": {"acc": 1.0},
        "np": np.float32(0.25),
    }[response]


BEHAVIOURS = ["ok", "raise", "hang", "nan", "inf", "str", "none", "dict", "nodict", "np", "spin"]
STATUSES = ["ok", "failed:exception:ZeroDivisionError", "failed:timeout", "failed:nonfinite",
            "failed:nonfinite", "failed:type", "failed:type", "ok", "failed:type", "ok",
            "failed:timeout"]  # fmt: skip
FAILURES = {"exception:ZeroDivisionError": 1, "timeout": 2, "nonfinite": 2, "type": 3}


@pytest.fixture
def runner():
    made = []

    def make(**kwargs):
        made.append(RewardRunner(misbehaving, **{"timeout_s": 0.2, "max_workers": 2, **kwargs}))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_failures_become_statuses_and_zeros(runner):
    """Every failure is a status and a 0, in worker processes: a sleep and a pure-Python spin
    each stop at their own 0.2 s timeout and the next call of the group runs."""
    r = runner()
    r.score_group("p", ["ok"], "1", {})  # workers started (forkserver, imports)
    start = time.monotonic()
    rewards, statuses, extras = r.score_group("p", BEHAVIOURS, "1", {})
    assert time.monotonic() - start < 2.5  # two 0.2 s timeouts, not 30 s or for ever
    assert statuses == STATUSES
    assert rewards.dtype == np.float32
    np.testing.assert_array_equal(rewards, [1, 0, 0, 0, 0, 0, 0, 0.5, 0, 0.25, 0])
    assert r.failures == collections.Counter(FAILURES)
    assert list(extras) == ["acc"]  # numeric metrics only; "pred" (a string) is not one
    assert extras["acc"][7] == 1.0 and sum(math.isnan(v) for v in extras["acc"]) == 10
    assert r.num_calls == 12


def test_a_call_stuck_in_c_code_kills_and_replaces_its_worker(runner):
    """The timer cannot reach it: past the group's budget (calls x timeout + slack) pebble kills
    the worker, the group's calls fail as timeouts, and a fresh worker serves the next group."""
    r = runner(max_workers=1)
    r.score_group("p", ["ok"], "1", {})
    before = set(r.worker_pids())
    start = time.monotonic()
    assert r.score_group("p", ["ok", "hang_in_c"], "1", {})[1] == ["failed:timeout"] * 2
    assert time.monotonic() - start < 15.0  # the budget is 2.4 s; the call itself would take 30 s
    assert r.score_group("p", ["ok"], "1", {})[1] == ["ok"]
    assert set(r.worker_pids()) != before  # the stuck worker is gone, another took its place


def test_a_crashing_reward_is_a_status_and_its_worker_is_replaced(runner):
    r = runner(max_workers=1)
    assert r.score_group("p", ["crash"], "1", {})[1] == ["failed:crash"]
    assert r.score_group("p", ["ok"], "1", {})[1] == ["ok"]
    assert r.failures == {"crash": 1}


def test_a_pool_that_pebble_gave_up_is_replaced(runner):
    """Pebble declares its pool broken when a worker dies between tasks (a race seen under load:
    the calls then fail with BrokenProcessPool, counted as crashes); the next call gets a new pool."""
    r = runner(max_workers=1)
    r._pool.stop()  # what a broken pool looks like from outside: no longer active
    assert r.score_group("p", ["ok"], "1", {})[1] == ["ok"]


def test_fifty_hanging_calls_leave_threads_and_processes_bounded(runner):
    """50 hangs over 10 groups: each costs its timeout, none outlives it; afterwards the
    scorer's process holds as many threads and worker processes as before, and scores."""
    r = runner(timeout_s=0.1, max_workers=2)
    r.score_group("p", ["ok"], "1", {})
    threads, workers = threading.active_count(), len(r.worker_pids())
    start = time.monotonic()
    results = r.score_groups([("p", ["hang"] * 5, "1", {}, None) for _ in range(10)])
    assert [s for _, statuses, _ in results for s in statuses] == ["failed:timeout"] * 50
    assert time.monotonic() - start < 15.0  # 50 x 0.1 s over 2 workers, plus overhead
    assert threading.active_count() <= threads and len(r.worker_pids()) <= workers
    assert r.score_group("p", ["ok", "ok"], "1", {})[1] == ["ok", "ok"]


def test_concurrent_groups_share_the_workers(runner):
    """The scorer scores requests in parallel threads: each caller's hang times out on its own."""
    from concurrent.futures import ThreadPoolExecutor

    r = runner(max_workers=1)
    with ThreadPoolExecutor(2) as callers:
        results = list(callers.map(lambda _: r.score_group("p", ["hang", "ok"], "1", {}), range(2)))
    assert [res[1] for res in results] == [["failed:timeout", "ok"]] * 2
    assert r.failures == {"timeout": 2} and r.num_calls == 4


def test_a_reward_spec_is_loaded_in_the_workers(tmp_path, runner):
    """A file spec (user code) is imported by each worker from the path the config names."""
    path = tmp_path / "my_reward.py"
    path.write_text("def score(prompt, response, ground_truth, extra):\n    return float(response == ground_truth)\n")
    r = RewardRunner(f"{path}:score", timeout_s=1.0, max_workers=1)
    try:
        assert r.score_group("p", ["1", "2"], "1", {})[0].tolist() == [1.0, 0.0]
    finally:
        r.close()


def test_inline_mode_has_no_processes_or_timeout():
    r = RewardRunner(misbehaving, timeout_s=None)
    behaviours = [b for b in BEHAVIOURS if b not in ("hang", "spin")]
    _, statuses, _ = r.score_group("p", behaviours, "1", {})
    assert statuses == [s for b, s in zip(BEHAVIOURS, STATUSES) if b not in ("hang", "spin")]


def reference_overlong(length, max_len, buffer, factor):
    # verl DAPORewardManager, written out: expected_len, exceed_len, min(-exceed/buffer*f, 0)
    expected_len = max_len - buffer
    exceed_len = length - expected_len
    return min(-exceed_len / buffer * factor, 0)


def test_overlong_penalty_matches_the_reference():
    """max 20, buffer 4: free up to 16 tokens, then -0.25 per token down to -1 at 20."""
    assert [overlong_penalty(n, 20, 4, 1.0) for n in (10, 16, 17, 18, 20)] == [0, 0, -0.25, -0.5, -1]
    for n, buffer, factor in itertools.product(range(0, 33), (1, 4, 8), (0.5, 1.0, 2.0)):
        expected = reference_overlong(n, 32, buffer, factor)
        assert overlong_penalty(n, 32, buffer, factor) == pytest.approx(expected)


def test_runner_applies_the_overlong_penalty_to_successes():
    runner = RewardRunner(
        misbehaving, timeout_s=None, overlong_buffer_len=4, overlong_penalty_factor=1.0,
        max_resp_len=20,
    )  # fmt: skip
    rewards, statuses, extras = runner.score_group(
        "p", ["ok", "ok", "ok", "raise"], "1", {}, response_lengths=[10, 17, 20, 20]
    )
    np.testing.assert_allclose(rewards, [1.0, 0.75, 0.0, 0.0])  # a failure stays exactly 0
    assert extras["overlong_reward"][:3] == [0.0, -0.25, -1.0]
    assert extras["overlong"][:3] == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="response_lengths"):
        runner.score_group("p", ["ok"], "1", {})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_workers": 0}, "max_workers"),
        ({"overlong_buffer_len": 4}, "max_resp_len"),
        ({"overlong_buffer_len": 8, "max_resp_len": 4}, "max_resp_len"),
    ],
)
def test_runner_validates_its_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardRunner(misbehaving, **kwargs)


def test_runner_with_a_builtin_math_reward_in_threads():
    """math-verify's signal timeouts would fail in a worker thread; ours are off, so it scores."""
    runner = RewardRunner(load_reward_fn("math"), timeout_s=5.0)
    rewards, statuses, _ = runner.score_group("", ["\\boxed{7}", "8"], "7", {})
    assert statuses == ["ok", "ok"] and rewards.tolist() == [1.0, 0.0]
    runner.close()
