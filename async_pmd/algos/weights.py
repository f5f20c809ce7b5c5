"""Weighted PMD: per-response `partition_weights` from a reward band filter and optional IS weights.

The band filter keeps a group only if its mean reward lies in the OPEN interval (lb, ub) — e.g.
(0, 1) with binary rewards drops the all-wrong and all-right groups, whose advantages carry no
signal. With `use_is` each kept response is further weighted by its share of the group's
partition function, w_i = exp((r_i − max_g)/τ) / mean_j exp((r_j − max_g)/τ), so the weights
average to 1 within a kept group. This is the seed's `compute_wpmd_weight`: band-filtered rows
stay in the batch with weight 0, so the loss's mean over rows counts them. The GroupStore applies
the band once: as these weights (`algorithm.band_filter: weight`, the seed's), or by dropping
groups at `put` with `group_band_mask` and then asking for weights with `apply_band=False`
(`band_filter: drop`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from async_pmd.algos.advantages import (
    broadcast_to_tokens,
    group_ids,
    group_sizes,
    partition_tau,
    segment_max,
    segment_sum,
    sequence_scores,
)

if TYPE_CHECKING:
    from async_pmd.config import AlgorithmConfig


def _band_keep(scores, gid, num_groups, lb, ub) -> torch.Tensor:
    group_mean = (segment_sum(scores, gid, num_groups) / group_sizes(gid, num_groups))[gid]
    keep = torch.ones_like(group_mean, dtype=torch.bool)
    if lb is not None:
        keep &= group_mean > lb
    if ub is not None:
        keep &= group_mean < ub
    return keep


def _importance_weights(scores, gid, num_groups, tau) -> torch.Tensor:
    # The max shift keeps exp in (0, 1], so tiny τ cannot overflow; the denominator is ≥ 1/n_g.
    e = torch.exp((scores - segment_max(scores, gid, num_groups)[gid]) / tau)
    return e / (segment_sum(e, gid, num_groups) / group_sizes(gid, num_groups))[gid]


def group_band_mask(scores: torch.Tensor, index, lb: float | None, ub: float | None) -> torch.Tensor:
    """Rows whose group's mean score is in the open interval (lb, ub) -> bool [B].

    scores [B] are sequence rewards; index [B] the group uids; None leaves that side unbounded.
    """
    scores = scores.to(torch.float64)
    gid, num_groups = group_ids(index, scores.device)
    return _band_keep(scores, gid, num_groups, lb, ub)


def group_importance_weights(scores: torch.Tensor, index, tau: float) -> torch.Tensor:
    """w_i = exp((r_i − max_g)/τ) / mean_j exp((r_j − max_g)/τ) -> [B] float64 (1 for a group of one)."""
    scores = scores.to(torch.float64)
    gid, num_groups = group_ids(index, scores.device)
    return _importance_weights(scores, gid, num_groups, tau)


def compute_wpmd_weight(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    config: AlgorithmConfig | None = None,
    use_is: bool = False,
    apply_band: bool = True,
) -> torch.Tensor:
    """Partition weights [B,T] for the opmd loss, on the response tokens (0 elsewhere).

    Band from `config.partition_reward_lb/ub` (None config = no band: every group kept), skipped
    with `apply_band=False` (the groups were band-filtered already); τ = `config.partition_tau`.
    `use_is` is an argument, not read from the config, so a caller can ask for either. Returned
    in the dtype of `token_level_rewards`.
    """
    scores = sequence_scores(token_level_rewards)
    gid, num_groups = group_ids(index, scores.device)
    lb = None if config is None or not apply_band else config.partition_reward_lb
    ub = None if config is None or not apply_band else config.partition_reward_ub
    weights = _band_keep(scores, gid, num_groups, lb, ub).to(torch.float64)
    if use_is:
        weights = weights * _importance_weights(scores, gid, num_groups, partition_tau(config))
    return broadcast_to_tokens(weights, response_mask, token_level_rewards)
