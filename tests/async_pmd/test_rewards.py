"""Reward functions score hand-worked examples; specs resolve to built-ins, modules and files
with clear errors; RewardRunner turns every failure into a status and a count, never raising."""

from __future__ import annotations

import collections
import itertools
import math
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


RELEASE = threading.Event()  # lets "hang" calls finish once a test has seen them time out


def misbehaving(prompt, response, ground_truth, extra):
    """Each response names a behaviour."""
    if response == "raise":
        raise ZeroDivisionError("boom")
    if response == "hang":
        RELEASE.wait(10)
        return 1.0
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


BEHAVIOURS = ["ok", "raise", "hang", "nan", "inf", "str", "none", "dict", "nodict", "np"]
STATUSES = ["ok", "failed:exception:ZeroDivisionError", "failed:timeout", "failed:nonfinite",
            "failed:nonfinite", "failed:type", "failed:type", "ok", "failed:type", "ok"]  # fmt: skip
FAILURES = {"exception:ZeroDivisionError": 1, "timeout": 1, "nonfinite": 2, "type": 3}


@pytest.fixture
def release_hung_calls():
    RELEASE.clear()
    yield
    RELEASE.set()


def wait_until(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


@pytest.mark.usefixtures("release_hung_calls")
def test_failures_become_statuses_and_zeros():
    runner = RewardRunner(misbehaving, timeout_s=0.2, max_workers=4)
    start = time.monotonic()
    rewards, statuses, extras = runner.score_group("p", BEHAVIOURS, "1", {})
    assert time.monotonic() - start < 1.5  # the hang costs one 0.2 s timeout, not 10 s
    assert statuses == STATUSES
    assert rewards.dtype == np.float32
    np.testing.assert_array_equal(rewards, [1, 0, 0, 0, 0, 0, 0, 0.5, 0, 0.25])
    assert runner.failures == collections.Counter(FAILURES)
    assert list(extras) == ["acc"]  # numeric metrics only; "pred" (a string) is not one
    assert extras["acc"][7] == 1.0 and sum(math.isnan(v) for v in extras["acc"]) == 9
    assert runner.num_calls == 10 and runner.num_stuck == 1
    RELEASE.set()
    assert wait_until(lambda: runner.num_stuck == 0)
    runner.close()


@pytest.mark.usefixtures("release_hung_calls")
def test_stuck_workers_are_replaced():
    """One worker, two hangs, then a good call: each hang times out in turn and a fresh worker
    takes over, so the good call still runs (about 0.4 s in all)."""
    runner = RewardRunner(misbehaving, timeout_s=0.2, max_workers=1)
    start = time.monotonic()
    _, statuses, _ = runner.score_group("p", ["hang", "hang", "ok"], "1", {})
    assert statuses == ["failed:timeout", "failed:timeout", "ok"]
    assert 0.35 < time.monotonic() - start < 1.5
    assert runner.num_stuck == 2
    RELEASE.set()
    assert wait_until(lambda: runner.num_stuck == 0)
    assert runner.score_group("p", ["ok"], "1", {})[1] == ["ok"]


@pytest.mark.usefixtures("release_hung_calls")
def test_concurrent_groups_share_the_workers():
    """The scorer scores requests in parallel threads: each caller times out its own hangs, so
    neither waits forever for a worker held by the other's hung call."""
    from concurrent.futures import ThreadPoolExecutor

    runner = RewardRunner(misbehaving, timeout_s=0.2, max_workers=1)
    with ThreadPoolExecutor(2) as callers:
        results = list(callers.map(lambda _: runner.score_group("p", ["hang", "ok"], "1", {}), range(2)))
    assert [r[1] for r in results] == [["failed:timeout", "ok"]] * 2
    assert runner.failures == {"timeout": 2} and runner.num_calls == 4


@pytest.mark.usefixtures("release_hung_calls")
def test_calls_are_refused_while_too_many_threads_are_stuck():
    runner = RewardRunner(misbehaving, timeout_s=0.1, max_workers=2, max_stuck_threads=2)
    assert runner.score_group("p", ["hang", "hang"], "1", {})[1] == ["failed:timeout"] * 2
    assert runner.score_group("p", ["ok"], "1", {})[1] == ["failed:stuck"]
    assert runner.failures == {"timeout": 2, "stuck": 1}
    RELEASE.set()
    assert wait_until(lambda: runner.num_stuck == 0)
    assert runner.score_group("p", ["ok"], "1", {})[1] == ["ok"]


def test_inline_mode_has_no_threads_or_timeout():
    runner = RewardRunner(misbehaving, timeout_s=None)
    behaviours = [b for b in BEHAVIOURS if b != "hang"]
    _, statuses, _ = runner.score_group("p", behaviours, "1", {})
    assert statuses == [s for b, s in zip(BEHAVIOURS, STATUSES) if b != "hang"]


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
        ({"max_stuck_threads": 0}, "max_stuck_threads"),
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
