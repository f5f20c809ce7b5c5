"""Validation: held-out prompts sampled at the current weights, scored, and summarised.

The job (`job/validate.py`) sends the val split through the running
Generator and RewardScorer deployments between learner steps; this module holds the pure parts:

    sampling = val_sampling(cfg.generator.val_kwargs)      # the GenerationRequest overrides
    requests = build_requests(prompts, ...)                # GenerationRequests, never the driver's
    metrics  = summarize(scored_groups)                     # val/reward/mean, val/pass@n, val/mean@n

Validation never touches training state: its requests bypass the RolloutDriver (so the data
cursor and the ledger do not move) and the GroupBuffer (so nothing is trained on), and it never
calls the learner (so the weights and the optimizer do not change).

Metrics, over P prompts with n responses each and rewards r_pj (a failed reward counts as 0):
  val/reward/mean  mean of all r_pj
  val/mean@n       mean over prompts of mean_j r_pj (the same number when every group is whole)
  val/pass@n       fraction of prompts with at least one response scoring >= `pass_score`
                   (1.0: the built-in rewards give exactly 1.0 for a right answer, so a response
                   cut by the overlong penalty does not pass)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from async_pmd import wire
from async_pmd.config import ValKwargs
from async_pmd.data import Prompt, generation_request

PASS_SCORE = 1.0
"""A response passes when its reward is at least this (full marks under the built-in rewards)."""

# Prometheus gauges of role "val" (`async_pmd_val_<name>`, defined in async_pmd.telemetry) -> metric.
GAUGES = {"reward_mean": "val/reward/mean", "pass_at_n": "val/pass@n", "mean_at_n": "val/mean@n"}

def val_sampling(val: ValKwargs) -> dict[str, Any]:
    """The GenerationRequest sampling overrides of validation, as verl's `val_kwargs` mean them:
    `do_sample: false` (or temperature 0) is greedy decoding, where top_p plays no part."""
    if not val.do_sample or val.temperature == 0.0:
        return {"n": val.n, "temperature": 0.0}
    return {"n": val.n, "temperature": val.temperature, "top_p": val.top_p}


def build_requests(
    prompts: Sequence[Prompt], *, sampling: dict[str, Any], prompts_per_request: int, tag: str,
) -> list[wire.GenerationRequest]:
    """The val prompts (tokenized at load, like training prompts) in requests of
    `prompts_per_request`; uids are `{tag}-{k}` and unique per call."""
    if prompts_per_request < 1:
        raise ValueError(f"prompts_per_request must be >= 1, got {prompts_per_request}")
    return [
        generation_request(k, 1, [f"{tag}-{start + j}" for j in range(len(chunk))], chunk, sampling)
        for k, start in enumerate(range(0, len(prompts), prompts_per_request))
        for chunk in [list(prompts[start:start + prompts_per_request])]
    ]


def summarize(groups: Sequence[wire.ScoredGroup], pass_score: float = PASS_SCORE) -> dict[str, float]:
    """The `val/*` metrics of scored groups (one group per val prompt); see the module docstring."""
    if not groups:
        raise ValueError("validation scored no groups")
    # A failed reward (by its status, whatever its value) is a wrong answer.
    rewards = [np.where([s == "ok" for s in g.reward_status], np.asarray(g.rewards, np.float64), 0.0)
               for g in groups]
    flat = np.concatenate(rewards)
    lengths = np.array([len(r) for g in groups for r in g.response_ids], np.float64)
    failed = sum(s != "ok" for g in groups for s in g.reward_status)
    return {
        "val/reward/mean": float(flat.mean()),
        "val/mean@n": float(np.mean([r.mean() for r in rewards])),
        "val/pass@n": float(np.mean([(r >= pass_score).any() for r in rewards])),
        "val/n": float(max(len(r) for r in rewards)),
        "val/prompts": float(len(groups)),
        "val/reward_failures": float(failed),
        "val/response_length/mean": float(lengths.mean()),
        "val/policy_version": float(min(g.policy_version for g in groups)),
    }
