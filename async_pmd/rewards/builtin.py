"""Built-in reward functions, all of one signature:

    fn(prompt: str, response: str, ground_truth: str, extra: dict) -> float | dict

A dict result carries "score" plus extra numeric metrics (logged per response, averaged by the
scorer). `response` is the decoded completion without special tokens; if it may still end in
the EOS text, pass that text as extra["eos_token"] and the synthetic rewards strip it.
Functions here are pure and fast; timeouts and failure accounting live in `runner.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RewardFn = Callable[[str, str, str, dict], "float | dict[str, Any]"]


def exact_match(prompt: str, response: str, ground_truth: str, extra: dict) -> float:
    """1.0 iff the response equals the ground truth once surrounding whitespace is stripped."""
    return float(response.strip() == ground_truth.strip())


def add_mod10_reward(prompt: str, response: str, ground_truth: str, extra: dict) -> float:
    """1.0 iff the response is exactly the answer digit: no spaces, nothing after it."""
    return float(_strip_eos(response, extra) == ground_truth)


def reverse_reward(prompt: str, response: str, ground_truth: str, extra: dict) -> dict[str, float]:
    """Partial credit: positions where the response agrees with the answer, over the LONGER length.

    Dividing by the longer of the two penalises both missing and surplus characters; only the
    exact answer scores 1.0. Answer "cba": "cba" 1.0, "cb" 2/3, "cbaa" 3/4, "abc" 1/3, "" 0.
    "exact" reports the 0/1 success.
    """
    response = _strip_eos(response, extra)
    longest = max(len(response), len(ground_truth))
    if longest == 0:
        return {"score": 1.0, "exact": 1.0}
    matches = sum(r == g for r, g in zip(response, ground_truth))
    return {"score": matches / longest, "exact": float(response == ground_truth)}


def math_reward(prompt: str, response: str, ground_truth: str, extra: dict) -> float:
    """1.0 iff math-verify finds the response's answer equivalent to the ground truth.

    The ground truth is parsed as `\\boxed{...}` (as verl does); math-verify's own signal-based
    timeouts are off because scoring runs in worker threads, where `RewardRunner` times calls.
    """
    from math_verify import parse, verify  # deferred: sympy is slow to import

    gold_text = ground_truth if "\\boxed" in ground_truth else f"\\boxed{{{ground_truth}}}"
    gold = parse(gold_text, parsing_timeout=None)
    answer = parse(response, parsing_timeout=None)
    if not gold or not answer:
        return 0.0
    return float(verify(gold, answer, timeout_seconds=None))


def gsm_tiny_reward(prompt: str, response: str, ground_truth: str, extra: dict) -> float:
    """gsm_tiny's integer answers: an exact string match first (fast), else `math_reward`."""
    if _strip_eos(response, extra).strip() == ground_truth:
        return 1.0
    return math_reward(prompt, _strip_eos(response, extra), ground_truth, extra)


def longtail_reward(prompt: str, response: str, ground_truth: str, extra: dict) -> dict[str, float]:
    """The reverse task's partial credit (agreeing positions over the longer length), so a long
    answer is learned a character at a time: "aaaa" for "aaaaaa" scores 4/6; "exact" is 0/1."""
    return reverse_reward(prompt, response, ground_truth, extra)


SYNTHETIC_REWARDS: dict[str, RewardFn] = {
    "add_mod10": add_mod10_reward,
    "longtail": longtail_reward,
    "reverse": reverse_reward,
    "gsm_tiny": gsm_tiny_reward,
}


def synthetic_reward(prompt: str, response: str, ground_truth: str, extra: dict) -> float | dict:
    """The reward of the synthetic task named by extra["task"] (set by `async_pmd.data`)."""
    task = extra.get("task")
    if task not in SYNTHETIC_REWARDS:
        raise KeyError(f"extra['task'] must be one of {sorted(SYNTHETIC_REWARDS)}, got {task!r}")
    return SYNTHETIC_REWARDS[task](prompt, response, ground_truth, extra)


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "math": math_reward,
    "synthetic": synthetic_reward,
    **SYNTHETIC_REWARDS,
}


# Pure string comparisons: microseconds, and they cannot hang. `math` (sympy) can, and so can
# any user reward; those always run in the scorer's worker processes.
STRING_REWARDS = frozenset({"exact_match", "add_mod10", "reverse"})


def is_string_reward(spec: str, task: str | None = None) -> bool:
    """Whether reward `spec` is a pure-string built-in; `synthetic` is one on such a `task`."""
    spec = spec.strip()
    return spec in STRING_REWARDS or (spec == "synthetic" and task in STRING_REWARDS)


def _strip_eos(response: str, extra: dict) -> str:
    eos = extra.get("eos_token")
    if isinstance(eos, str) and eos and response.endswith(eos):
        return response[: -len(eos)]
    return response
