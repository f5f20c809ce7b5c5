"""Reward functions and the runner that applies them to a group of responses.

    fn = load_reward_fn("synthetic")                # or "pkg.mod:fn", "path/to/file.py:fn"
    runner = RewardRunner(fn, timeout_s=5.0)
    rewards, statuses, extras = runner.score_group(prompt, responses, answer, extra)
"""

from async_pmd.rewards.builtin import (
    BUILTIN_REWARDS,
    RewardFn,
    add_mod10_reward,
    exact_match,
    gsm_tiny_reward,
    is_string_reward,
    math_reward,
    reverse_reward,
    synthetic_reward,
)
from async_pmd.rewards.custom import load_reward_fn
from async_pmd.rewards.runner import RewardRunner, overlong_penalty, runner_for

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFn",
    "RewardRunner",
    "add_mod10_reward",
    "exact_match",
    "gsm_tiny_reward",
    "is_string_reward",
    "load_reward_fn",
    "math_reward",
    "overlong_penalty",
    "reverse_reward",
    "runner_for",
    "synthetic_reward",
]
