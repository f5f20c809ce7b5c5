"""A reward function that fails on purpose, for the scorer fault tests (`scorer.reward_fn=<this file>:reward`).

About 1 call in 100 each raises ValueError, hangs for HANG_S (run it with a scorer.timeout_s well
below that), returns NaN, or returns a string; the rest score as the built-in synthetic reward.
Which call fails depends only on (prompt, response), by CRC-32, so a re-issued request fails the
same way in any process.
"""

import math
import time
import zlib

from async_pmd.rewards.builtin import synthetic_reward

HANG_S = 1.0
FAULTS = 100  # one call in FAULTS per kind of fault


def reward(prompt: str, response: str, ground_truth: str, extra: dict):
    fault = zlib.crc32(f"{prompt}\0{response}".encode()) % FAULTS
    if fault == 0:
        raise ValueError("injected reward failure")
    if fault == 1:
        time.sleep(HANG_S)
        return 1.0
    if fault == 2:
        return math.nan
    if fault == 3:
        return "not a number"
    return synthetic_reward(prompt, response, ground_truth, extra)
