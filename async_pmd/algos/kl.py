"""KL penalty between the policy and a reference policy: verl's `kl_penalty` and the KL-loss term.

`kl_penalty(log_prob, ref_log_prob, kl_type)` is the per-token estimate of KL(π_θ ‖ π_ref) from
log-probs of the sampled tokens (J. Schulman, "Approximating KL divergence", 2020), with verl's
type names. `compute_kl_loss` aggregates it over the response, the `actor.use_kl_loss` term:
loss = policy loss + `actor.kl_loss_coef` · kl_loss. Pure torch; padding never reaches the result.
"""

from __future__ import annotations

import torch

from async_pmd.algos.losses import agg_loss, masked_mean, sum_norm_length

KL_TYPES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
"""Accepted `kl_type`s; a trailing `+` (e.g. `k3+`) keeps the value and takes k2's gradient."""
KL_CLAMP = 20.0  # verl clamps log(π_ref/π_θ) before exp in low_var_kl
LOW_VAR_KL_CLAMP = 10.0  # ... and the k3 value itself


def _forward(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kl_type: str) -> torch.Tensor:
    diff = log_prob - ref_log_prob
    if kl_type in ("kl", "k1"):
        return diff
    if kl_type == "abs":
        return diff.abs()
    if kl_type in ("mse", "k2"):
        return 0.5 * diff.square()
    # low_var_kl / k3: exp(ref − lp) − (ref − lp) − 1 ≥ 0, unbiased for KL(π_θ ‖ π_ref) and low variance.
    kl = (-diff).clamp(-KL_CLAMP, KL_CLAMP)
    return (torch.exp(kl) - kl - 1).clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kl_type: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL estimate [B,T] for log-probs [B,T] of the sampled tokens, as verl's `kl_penalty`.

    kl/k1: lp − ref. abs: |lp − ref|. mse/k2: ½(lp − ref)². low_var_kl/k3: e^(ref−lp) − (ref−lp) − 1,
    the exponent clamped to ±20 and the value to ±10. A trailing `+` (`k1+`, `k3+`, ...): the same
    value with the gradient of k2 (straight-through), which is the unbiased KL gradient.
    `full` (needs the whole vocabulary's logits) is not supported: ValueError, as for any other name.
    """
    base = kl_type.removesuffix("+")
    if base not in KL_TYPES:
        raise ValueError(f"kl_penalty: unknown kl_type {kl_type!r}; allowed: {list(KL_TYPES)} (optionally with '+')")
    value = _forward(log_prob, ref_log_prob, base)
    if base == kl_type or base in ("mse", "k2"):
        return value
    k2 = 0.5 * (log_prob - ref_log_prob).square()
    return k2 - k2.detach() + value.detach()


def compute_kl_loss(
    log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    kl_loss_type: str = "low_var_kl",
    loss_agg_mode: str = "seq-mean-token-mean",
    max_response_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The KL-loss term: `agg_loss(kl_penalty(log_prob, ref_log_prob, kl_loss_type), mask, mode)`.

    As verl's actor: the same aggregation as the policy loss (sum-norm divides by
    `max_response_length`, else the mask width). Gradient flows through `log_prob`; the caller
    adds `kl_loss_coef · kl_loss`. Metrics: `actor/kl_loss` (the term), `actor/ref_kl` (token
    mean of the estimate, whatever the aggregation).
    """
    kld = kl_penalty(log_prob, ref_log_prob, kl_loss_type)
    sum_norm = loss_agg_mode == "seq-mean-token-sum-norm"
    scale = sum_norm_length(response_mask, max_response_length) if sum_norm else None
    loss = agg_loss(kld, response_mask, loss_agg_mode, loss_scale_factor=scale)
    metrics = {"actor/kl_loss": float(loss.detach()), "actor/ref_kl": float(masked_mean(kld.detach(), response_mask))}
    return loss, metrics
