"""Validation: held-out prompts sampled at the current weights, scored, and summarised.

The trainer (`services/trainer.py`, `Trainer.validate`) sends the val split through the running
Generator and RewardScorer deployments between learner steps; this module holds the pure parts:

    sampling = val_sampling(cfg.generator.val_kwargs)      # the GenerationRequest overrides
    requests = build_requests(prompts, tokenizer, ...)     # GenerationRequests, never the driver's
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
from async_pmd.data import Prompt, format_prompt

PASS_SCORE = 1.0
"""A response passes when its reward is at least this (full marks under the built-in rewards)."""

# Prometheus gauges of role "val" (`async_pmd_val_<name>`, defined in async_pmd.telemetry) -> metric.
GAUGES = {"reward_mean": "val/reward/mean", "pass_at_n": "val/pass@n", "mean_at_n": "val/mean@n"}

_SCALARS = (bool, int, float, str)


def val_sampling(val: ValKwargs) -> dict[str, Any]:
    """The GenerationRequest sampling overrides of validation, as verl's `val_kwargs` mean them:
    `do_sample: false` (or temperature 0) is greedy decoding, where top_p plays no part."""
    if not val.do_sample or val.temperature == 0.0:
        return {"n": val.n, "temperature": 0.0}
    return {"n": val.n, "temperature": val.temperature, "top_p": val.top_p}


def build_requests(
    prompts: Sequence[Prompt],
    tokenizer: Any,
    *,
    apply_chat_template: bool,
    sampling: dict[str, Any],
    prompts_per_request: int,
    tag: str,
) -> list[wire.GenerationRequest]:
    """The val prompts in requests of `prompts_per_request`, encoded as the RolloutDriver encodes
    training prompts (same chat template, same extras); uids are `{tag}-{k}` and unique per call."""
    if prompts_per_request < 1:
        raise ValueError(f"prompts_per_request must be >= 1, got {prompts_per_request}")
    requests = []
    for start in range(0, len(prompts), prompts_per_request):
        chunk = list(prompts[start:start + prompts_per_request])
        texts = [format_prompt(p.text, tokenizer, apply_chat_template) for p in chunk]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        requests.append(wire.GenerationRequest(
            request_id=len(requests), attempt=1,
            uids=[f"{tag}-{start + j}" for j in range(len(chunk))],
            prompt_ids=[np.asarray(x, np.int32) for x in ids], prompt_texts=[p.text for p in chunk],
            answers=[p.answer for p in chunk], sample_indices=[p.index for p in chunk],
            extras=[{k: v for k, v in p.extra.items() if isinstance(v, _SCALARS)} for p in chunk],
            sampling=dict(sampling),
        ))
    return requests


def summarize(groups: Sequence[wire.ScoredGroup], pass_score: float = PASS_SCORE) -> dict[str, float]:
    """The `val/*` metrics of scored groups (one group per val prompt); see the module docstring."""
    if not groups:
        raise ValueError("validation scored no groups")
    # A failed reward is NaN under on_failure=drop_group: for validation it is a wrong answer.
    rewards = [np.nan_to_num(np.asarray(g.rewards, np.float64), nan=0.0) for g in groups]
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
