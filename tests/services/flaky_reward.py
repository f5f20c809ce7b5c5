"""A reward for the monitoring test: the synthetic task's, except that about one response in
twelve raises, so the scorer's failure counters (by reason) have something to count."""

import zlib

from async_pmd.rewards.builtin import synthetic_reward


def reward(prompt: str, response: str, ground_truth: str, extra: dict) -> float | dict:
    if zlib.crc32(f"{prompt}|{response}".encode()) % 12 == 0:
        raise ValueError("flaky reward: deliberate failure")
    return synthetic_reward(prompt, response, ground_truth, extra)
