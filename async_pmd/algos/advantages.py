"""Group-relative advantage estimators: `ploo`, `ploo_exact`, `rloo`, `partition`, `grpo`.

A *group* is the n responses to one prompt, named by `index` (a uid per row; strings or ints,
rows of a group need not be contiguous). Each estimator turns the sequence score
r_i = Σ_t token_level_rewards[i, t] into one advantage A_i per response and broadcasts it over the
row's response tokens. Everything is vectorised with segment ops keyed by a dense group id
(`group_ids`): no Python loop per sample or per group. Sums are taken in float64, results are
returned in the dtype of `token_level_rewards`. `returns` equals `advantages`, as in verl.
`ploo`, `rloo` and `grpo` equal the seed's (verl's) code term for term, groups of one included;
`ploo_exact` is the opt-in exact leave-one-out variant of `ploo`.

All estimators share `fn(token_level_rewards [B,T], response_mask [B,T], index [B], config=None)
-> (advantages [B,T], returns [B,T])`; `config` is an `AlgorithmConfig` (or None for defaults).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from async_pmd.algos.registry import register_adv_est

if TYPE_CHECKING:
    from async_pmd.config import AlgorithmConfig

# Defaults of AlgorithmConfig, used when an estimator is called with config=None (tests, tools).
DEFAULT_PARTITION_TAU = 1.0
DEFAULT_NORM_ADV_BY_STD = True
GRPO_EPS = 1e-6  # verl's epsilon in (r - mean) / (std + eps)
LOO_MEAN_FLOOR = 1e-8  # the seed's clamp on the leave-one-out mean before the log

# ----------------------------------------------------------------------------- segment primitives


def group_ids(index, device: torch.device | str | None = None) -> tuple[torch.Tensor, int]:
    """Dense group ids: (gid [B] int64 in [0, G), G) for any array-like of hashable uids.

    Ids are numbered in order of first appearance (numeric uids: in sorted order).
    """
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    index = np.asarray(index).reshape(-1)
    if index.dtype.kind in "biuf":  # numeric uids: one sort is the fastest factorisation
        uniques, inverse = np.unique(index, return_inverse=True)
        return torch.as_tensor(inverse.reshape(-1), dtype=torch.long, device=device), len(uniques)
    # String / object uids (verl's are uuid4 strings in an object array): hashing is 2-4x faster
    # than np.unique's string sort, which dominated the whole estimator at B = 8192.
    first_seen: dict = {}
    inverse = np.fromiter((first_seen.setdefault(u, len(first_seen)) for u in index.tolist()), np.int64, index.size)
    return torch.as_tensor(inverse, device=device), len(first_seen)


def segment_sum(values: torch.Tensor, gid: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Σ of values [B] per group -> [G]."""
    return values.new_zeros(num_groups).index_add_(0, gid, values)


def segment_max(values: torch.Tensor, gid: torch.Tensor, num_groups: int) -> torch.Tensor:
    """max of values [B] per group -> [G]; -inf for a group with no rows."""
    out = values.new_full((num_groups,), float("-inf"))
    return out.scatter_reduce_(0, gid, values, reduce="amax", include_self=False)


def group_sizes(gid: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rows per group -> [G] float64."""
    return torch.bincount(gid, minlength=num_groups).to(torch.float64)


def sequence_scores(token_level_rewards: torch.Tensor) -> torch.Tensor:
    """r_i = row sum of token_level_rewards [B,T] -> [B] float64."""
    # Sum in (at least) float32 and upcast the [B] result: a float64 copy of the whole [B,T]
    # tensor costs more than the group math, and rows hold a handful of non-zero rewards.
    sum_dtype = torch.promote_types(token_level_rewards.dtype, torch.float32)
    return token_level_rewards.sum(dim=-1, dtype=sum_dtype).to(torch.float64)


def broadcast_to_tokens(adv: torch.Tensor, response_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row values [B] -> [B,T] on the response tokens (0 elsewhere), in `like`'s dtype."""
    # Cast before broadcasting: a float64 [B,T] temporary would cost more than all the group math.
    return adv.to(like.dtype).unsqueeze(-1) * response_mask.to(like.dtype)


def partition_tau(config: AlgorithmConfig | None) -> float:
    """τ of the baselines and weights: `config.partition_tau` (1.0 for None); ValueError if ≤ 0."""
    tau = DEFAULT_PARTITION_TAU if config is None else float(config.partition_tau)
    if not tau > 0:
        raise ValueError(f"algorithm.partition_tau must be > 0, got {tau}")
    return tau


# ----------------------------------------------------------------------------- baselines


def log_mean_exp_baseline(scores: torch.Tensor, gid: torch.Tensor, num_groups: int, tau: float) -> torch.Tensor:
    """All-in partition baseline τ·log mean_j exp(r_j/τ) of each row's group -> [B].

    Shifted by the group max so that exp never overflows, even at τ = 0.01.
    """
    m = segment_max(scores, gid, num_groups)
    z = segment_sum(torch.exp((scores - m[gid]) / tau), gid, num_groups)
    return (m + tau * torch.log(z / group_sizes(gid, num_groups)))[gid]


def seed_loo_baseline(scores: torch.Tensor, gid: torch.Tensor, num_groups: int, tau: float) -> torch.Tensor:
    """The seed's leave-one-out baseline b_i = m + τ·log clamp((Z − e_i)/(n − 1), min=1e-8) -> [B].

    m = group max (own score included), e_j = exp((r_j − m)/τ), Z = Σ_j e_j; 0 for a group of one.
    For the group's leader the clamp acts once the others trail it by more than 18.42τ (their mean
    e falls below 1e-8; past ~37τ, Z − e_i is exactly 0 in float64), so b ≥ m − 18.42τ and the
    leader's A ≤ 18.42τ. That is the seed's behaviour, kept on purpose;
    `loo_log_mean_exp_baseline` is the exact form.
    """
    n = group_sizes(gid, num_groups)[gid]
    m = segment_max(scores, gid, num_groups)[gid]
    e = torch.exp((scores - m) / tau)  # in (0, 1], exactly 1 at the max
    z = segment_sum(e, gid, num_groups)[gid]
    loo_mean = ((z - e) / (n - 1).clamp(min=1)).clamp(min=LOO_MEAN_FLOOR)
    return torch.where(n > 1, m + tau * torch.log(loo_mean), torch.zeros_like(scores))


def loo_log_mean_exp_baseline(scores: torch.Tensor, gid: torch.Tensor, num_groups: int, tau: float) -> torch.Tensor:
    """Exact leave-one-out baseline b_i = τ·log mean_{j≠i} exp(r_j/τ) -> [B]; 0 for a group of one.

    Stable around the group max (the `ploo_exact` estimator). The seed's Z_g − e_i cancels
    catastrophically for the row holding the max when the others are far below it (at τ = 0.01
    with binary rewards exp(-100) vanishes next to 1, leaving 0, which the 1e-8 clamp then turns
    into b = max − 18.4τ: `seed_loo_baseline`). So one argmax
    row per group is handled separately: its sum runs over the other rows, shifted by their own
    max (the group's second largest score), and never subtracts. For every other row Z_g − e_i
    still contains the max's own term 1, so the difference is ≥ 1 and costs only rounding.
    """
    rows = torch.arange(scores.numel(), device=scores.device)
    n = group_sizes(gid, num_groups)
    m = segment_max(scores, gid, num_groups)
    e = torch.exp((scores - m[gid]) / tau)  # in (0, 1], exactly 1 at the max
    z = segment_sum(e, gid, num_groups)

    # One argmax row per group (the lowest row index among ties).
    at_max_rows = torch.where(scores == m[gid], rows, scores.numel())
    argmax_row = torch.full((num_groups,), scores.numel(), device=scores.device, dtype=torch.long)
    argmax_row = argmax_row.scatter_reduce_(0, gid, at_max_rows, reduce="amin")
    is_argmax = rows == argmax_row[gid]

    # The others' max m2_g (the max itself again on ties; -inf -> m_g for a group of one).
    m2 = segment_max(torch.where(is_argmax, float("-inf"), scores), gid, num_groups)
    m2 = torch.where(torch.isfinite(m2), m2, m)
    e2 = torch.where(is_argmax, 0.0, torch.exp((scores - m2[gid]) / tau))
    z2 = segment_sum(e2, gid, num_groups)

    shift = torch.where(is_argmax, m2[gid], m[gid])
    loo_sum = torch.where(is_argmax, z2[gid], z[gid] - e)
    loo_mean = (loo_sum / (n[gid] - 1).clamp(min=1)).clamp(min=LOO_MEAN_FLOOR)
    baseline = shift + tau * torch.log(loo_mean)
    return torch.where(n[gid] > 1, baseline, torch.zeros_like(baseline))


# ----------------------------------------------------------------------------- estimators


def _against_baseline(baseline_fn, token_level_rewards, response_mask, index, config):
    """A_i = r_i − baseline_fn(scores, group id, groups, τ)_i, on every response token."""
    scores = sequence_scores(token_level_rewards)
    gid, g = group_ids(index, scores.device)
    adv = broadcast_to_tokens(scores - baseline_fn(scores, gid, g, partition_tau(config)), response_mask,
                              token_level_rewards)
    return adv, adv


@register_adv_est("ploo")
def compute_ploo_advantage(token_level_rewards, response_mask, index, config: AlgorithmConfig | None = None):
    """PMD-partition, the seed's code: A_i = r_i − b_i with `seed_loo_baseline`; a group of one has b = 0.

    Where the leave-one-out sum cancels (a lone winner far above the rest at small τ) the seed's
    clamp caps the winner's advantage at 18.42τ: one correct answer of 8 binary rewards at τ = 0.01
    gets A = 0.1842, not the exact 1.0 of `ploo_exact`.
    """
    return _against_baseline(seed_loo_baseline, token_level_rewards, response_mask, index, config)


@register_adv_est("ploo_exact")
def compute_ploo_exact_advantage(token_level_rewards, response_mask, index, config: AlgorithmConfig | None = None):
    """PMD-partition, exact: A_i = r_i − τ·log mean_{j≠i} exp(r_j/τ); a group of one has b = 0 (A = r_i).

    Differs from `ploo` (the seed's) only where the seed's Z − e_i cancels: with binary rewards at
    τ = 0.01 a lone winner gets A = 1.0 here and 0.1842 there; with continuous rewards, whenever
    the top score leads the runner-up by about 18τ or more. Every other row agrees to rounding.
    """
    return _against_baseline(loo_log_mean_exp_baseline, token_level_rewards, response_mask, index, config)


@register_adv_est("partition")
def compute_partition_advantage(token_level_rewards, response_mask, index, config: AlgorithmConfig | None = None):
    """All-in partition baseline: A_i = r_i − τ·log mean_j exp(r_j/τ) (a group of one gets 0)."""
    return _against_baseline(log_mean_exp_baseline, token_level_rewards, response_mask, index, config)


@register_adv_est("rloo")
def compute_rloo_advantage(token_level_rewards, response_mask, index, config: AlgorithmConfig | None = None):
    """PMD-mean: A_i = r_i − mean_{j≠i} r_j = n/(n−1)·(r_i − mean_g); a group of one gets A = r_i (verl)."""
    scores = sequence_scores(token_level_rewards)
    gid, g = group_ids(index, scores.device)
    n = group_sizes(gid, g)[gid]
    mean = (segment_sum(scores, gid, g) / group_sizes(gid, g))[gid]
    adv = torch.where(n > 1, (scores - mean) * n / (n - 1).clamp(min=1), scores)
    adv = broadcast_to_tokens(adv, response_mask, token_level_rewards)
    return adv, adv


@register_adv_est("grpo")
def compute_grpo_advantage(token_level_rewards, response_mask, index, config: AlgorithmConfig | None = None):
    """GRPO (comparison runs): (r_i − mean_g)/(std_g + 1e-6), std unbiased as torch.std.

    With `norm_adv_by_std_in_grpo=False` (Dr. GRPO): r_i − mean_g. A group of one gets verl's
    mean 0 and std 1: A = r_i/(1 + 1e-6), or r_i without the std.
    """
    norm_by_std = DEFAULT_NORM_ADV_BY_STD if config is None else bool(config.norm_adv_by_std_in_grpo)
    scores = sequence_scores(token_level_rewards)
    gid, g = group_ids(index, scores.device)
    n = group_sizes(gid, g)
    centred = scores - (segment_sum(scores, gid, g) / n)[gid]
    adv = centred
    if norm_by_std:
        # Two-pass variance (sum of squared deviations) stays exact when all rewards are equal.
        std = torch.sqrt(segment_sum(centred**2, gid, g) / (n - 1).clamp(min=1))
        adv = centred / (std[gid] + GRPO_EPS)
    alone = scores / (1 + GRPO_EPS) if norm_by_std else scores
    adv = torch.where(n[gid] > 1, adv, alone)
    adv = broadcast_to_tokens(adv, response_mask, token_level_rewards)
    return adv, adv
