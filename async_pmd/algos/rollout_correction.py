"""Rollout correction: the inference engine's log-probs against the learner's, as verl's rollout_corr_helper.

The engine that sampled a response (SGLang, vLLM, the torch engine) and the learner score the same
tokens with different kernels and precisions, and in an asynchronous run with different policy
versions; log π_learner − log π_engine is that mismatch, per token. Two pure functions turn it into:

- truncated importance weights (TIS), which the `opmd` and `vanilla` losses multiply in through
  `rollout_is_weights=`: token level w_t = min(exp(lr_t), C), sequence level
  w_i = min(exp(Σ_t lr_t), C) on every token of row i, with lr = log π_learner − log π_engine
  clamped to ±20 before exp and C = `actor.rollout_is_threshold`; detached, 0 on padding;
- mismatch metrics `rollout_corr/*` on the response tokens.

`compute_rollout_correction` does both from an `ActorConfig` (`actor.rollout_is`: None = metrics
only, as verl's default). Inputs are [B,T] log-probs of the sampled tokens and the response mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from async_pmd.config import ActorConfig

ROLLOUT_IS_LEVELS = ("token", "sequence")
DEFAULT_ROLLOUT_IS_THRESHOLD = 2.0  # verl's default
SAFETY_BOUND = 20.0  # verl clamps log-ratios to ±20 before exp, so one wild token cannot overflow


def _masked_log_ratio(log_prob, rollout_log_prob, response_mask, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # (log π_learner − log π_engine with padding set to 0 [B,T], bool mask [B,T]); never a gradient.
    mask = response_mask > 0
    diff = log_prob.detach().to(dtype) - rollout_log_prob.detach().to(dtype)
    return torch.where(mask, diff, 0.0), mask


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def compute_rollout_correction_weights(
    log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is: str = "token",
    rollout_is_threshold: float = DEFAULT_ROLLOUT_IS_THRESHOLD,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated IS weights [B,T] (detached, 0 on padding) and their metrics, as verl's TIS.

    `rollout_is`: "token" or "sequence" (verl's names); ValueError otherwise or if the threshold
    is not > 0. Metrics, before truncation: `rollout_corr/rollout_is_mean` (token mean of the
    weights), `rollout_corr/rollout_is_max`, `rollout_corr/rollout_is_ratio_fraction_high` (share of
    response tokens, or of non-empty rows at sequence level, whose weight exceeds the threshold).
    """
    if rollout_is not in ROLLOUT_IS_LEVELS:
        raise ValueError(f"rollout_is must be one of {list(ROLLOUT_IS_LEVELS)}, got {rollout_is!r}")
    if not rollout_is_threshold > 0:
        raise ValueError(f"rollout_is_threshold must be > 0, got {rollout_is_threshold}")
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    log_ratio, mask = _masked_log_ratio(log_prob, rollout_log_prob, response_mask, dtype)
    if rollout_is == "token":
        log_weight = log_ratio
    else:
        log_weight = log_ratio.sum(dim=-1, keepdim=True).expand_as(log_ratio)  # Σ_t lr_t on every token
    raw = torch.where(mask, torch.exp(log_weight.clamp(-SAFETY_BOUND, SAFETY_BOUND)), 0.0)  # [B,T]

    high = raw > rollout_is_threshold
    if rollout_is == "token":
        fraction_high = _masked_mean(high.to(dtype), mask)
    else:
        rows = mask.any(dim=-1)
        fraction_high = (high.any(dim=-1) & rows).sum().to(dtype) / rows.sum().clamp(min=1)
    metrics = {
        "rollout_corr/rollout_is_mean": _masked_mean(raw, mask),
        "rollout_corr/rollout_is_max": raw.max() if raw.numel() else raw.new_zeros(()),
        "rollout_corr/rollout_is_ratio_fraction_high": fraction_high,
    }
    return raw.clamp(max=rollout_is_threshold), {k: float(v) for k, v in metrics.items()}


def compute_rollout_mismatch_metrics(
    log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, float]:
    """Mismatch of learner and engine log-probs over the response tokens, in float64 (0s for an empty mask).

    With lr = log π_learner − log π_engine per token: `rollout_corr/log_ratio_mean` = mean lr;
    `rollout_corr/kl` = mean(−lr), verl's k1 estimate of KL(π_engine ‖ π_learner) (the tokens were
    sampled from the engine); `rollout_corr/k3_kl` = mean(e^lr − lr − 1), verl's k3 estimate of the
    same KL (≥ 0, low variance); `rollout_corr/log_ratio_abs_max` = max |lr|. Nats per token.
    """
    log_ratio, mask = _masked_log_ratio(log_prob, rollout_log_prob, response_mask, torch.float64)
    mean = _masked_mean(log_ratio, mask)
    k3 = _masked_mean(torch.exp(log_ratio) - log_ratio - 1, mask)
    abs_max = log_ratio.abs().max() if log_ratio.numel() else log_ratio.new_zeros(())
    values = torch.stack([mean, -mean, k3, abs_max]).tolist()  # one device->host copy
    names = ("log_ratio_mean", "kl", "k3_kl", "log_ratio_abs_max")
    return {f"rollout_corr/{name}": value for name, value in zip(names, values)}


def compute_rollout_correction(
    log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    config: ActorConfig | None = None,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """(rollout_is_weights or None, metrics) from `config.rollout_is` / `config.rollout_is_threshold`.

    Always returns the mismatch metrics; adds the IS weights and their metrics when
    `rollout_is` is set (None config, or `rollout_is: null`: metrics only, weights None).
    """
    metrics = compute_rollout_mismatch_metrics(log_prob, rollout_log_prob, response_mask)
    level = None if config is None else config.rollout_is
    if level is None:
        return None, metrics
    weights, is_metrics = compute_rollout_correction_weights(
        log_prob, rollout_log_prob, response_mask, level, config.rollout_is_threshold)
    return weights, {**metrics, **is_metrics}
