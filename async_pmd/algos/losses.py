"""Policy losses `opmd` (online policy mirror descent, the seed's) and `vanilla` (verl's dual-clip PPO), and helpers.

Shared signature: `fn(old_log_prob [B,T], log_prob [B,T], advantages [B,T], response_mask [B,T],
loss_agg_mode="seq-mean-token-mean", config=None, partition_weights=None [B,T],
rollout_is_weights=None [B,T], max_response_length=None) -> (loss, metrics)`.
`old_log_prob` is the behaviour policy's per-token log-prob (the generator's, "bypass mode"),
`log_prob` carries the gradient, `config` is an `ActorConfig` (None for defaults),
`rollout_is_weights` are the detached truncated IS weights of `algos.rollout_correction` (None =
no correction), `max_response_length` is L_max of `seq-mean-token-sum-norm`: the configured
`generator.response_length`, which verl pads every batch to (None = the mask width, the seed's
literal code, which varies with our batches' longest response). Metrics are floats named
`actor/<metric>`. Padding positions (mask 0) never reach the loss, even if they
hold inf/NaN, and a row with an empty mask contributes 0 rather than NaN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from async_pmd.algos.registry import register_policy_loss
from async_pmd.config import LOSS_AGG_MODES, OPMD_AGG_MODES

if TYPE_CHECKING:
    from async_pmd.config import ActorConfig

# Defaults of PolicyLossConfig, used when a loss is called with config=None.
DEFAULT_PMD_TAU = 1.0
DEFAULT_CLIP_RATIO = 0.2
DEFAULT_CLIP_RATIO_C = 3.0  # verl's dual-clip bound on the ratio for A < 0
LOG_RATIO_CLAMP = 20.0  # verl clamps log π_θ − log π_old before exp so a stale sample cannot overflow

# ----------------------------------------------------------------------------- helpers


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over mask (over `dim`, or everything); 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    x = torch.where(mask > 0, x, 0.0)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1e-8)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1e-8)


def masked_row_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t x[b,t]·mask[b,t] -> [B]; padding values (even inf/NaN) are dropped, not multiplied."""
    mask = mask.to(x.dtype)
    return (torch.where(mask > 0, x, 0.0) * mask).sum(dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis: [B,T,V] -> [B,T]."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def check_loss_agg_mode(loss_agg_mode: str, allowed: tuple[str, ...] = LOSS_AGG_MODES, who: str = "agg_loss"):
    """ValueError naming the allowed modes unless `loss_agg_mode` is one of them."""
    if loss_agg_mode not in allowed:
        raise ValueError(f"{who}: unknown loss_agg_mode {loss_agg_mode!r}; allowed: {list(allowed)}")


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str,
             loss_scale_factor: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B,T] to a scalar, term for term as verl's `agg_loss` (one rank).

    token-mean: Σ loss / Σ mask. seq-mean-token-sum: mean over non-empty rows of Σ_t loss.
    seq-mean-token-mean: mean over non-empty rows of Σ_t loss / (L_b + 1e-8). seq-mean-token-sum-norm
    (Dr. GRPO): Σ_b Σ_t loss / `loss_scale_factor` — a SUM over rows, as in verl; the factor
    defaults to T = loss_mask.shape[-1], as verl's does (pass the configured response length).
    A batch with no response token gives 0 (verl: NaN).
    """
    check_loss_agg_mode(loss_agg_mode)
    if loss_agg_mode == "token-mean":
        return masked_mean(loss_mat, loss_mask)
    row_sums = masked_row_sum(loss_mat, loss_mask)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return row_sums.sum() / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    lengths = loss_mask.to(row_sums.dtype).sum(dim=-1)
    if loss_agg_mode == "seq-mean-token-mean":
        row_sums = row_sums / (lengths + 1e-8)
    nonempty = (lengths > 0).to(row_sums.dtype)  # verl leaves fully masked rows out of the seq-mean
    return (row_sums * nonempty).sum() / nonempty.sum().clamp(min=1)


ROW_MEAN_LOSSES = ("opmd",)
"""Policy losses that average over every row of the batch (empty rows included) instead of `agg_loss`."""


def micro_batch_share(loss_agg_mode: str, micro_mask: torch.Tensor, whole_mask: torch.Tensor,
                      row_mean: bool = False) -> float:
    """w_i with Σ_i w_i · agg(micro-batch i) = agg(whole batch), for micro-batches that partition the rows.

    The mask arguments are response masks [b,T], [B,T] (widths may differ). `agg_loss`'s modes:
    token-mean t_i/t (response tokens); seq-mean-token-sum and seq-mean-token-mean n_i/n (non-empty
    rows, the rows its seq-mean counts); seq-mean-token-sum-norm 1 (a sum over rows, with the same
    L_max for every micro-batch). `row_mean` (the losses in `ROW_MEAN_LOSSES`): b/B, every row.
    0 when the whole batch has none of what the mode counts (its loss is then 0 as well).
    """
    check_loss_agg_mode(loss_agg_mode)
    if row_mean:
        return micro_mask.shape[0] / max(whole_mask.shape[0], 1)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return 1.0
    if loss_agg_mode == "token-mean":
        part, whole = float(micro_mask.sum()), float(whole_mask.sum())
    else:
        part, whole = float((micro_mask.sum(-1) > 0).sum()), float((whole_mask.sum(-1) > 0).sum())
    return part / whole if whole > 0 else 0.0


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # bf16 log-probs lose the small differences the loss is made of; never go below float32.
    return torch.promote_types(t.dtype, torch.float32)


def _to_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    # One device->host copy for all metrics instead of one sync per `.item()`.
    values = torch.stack([v.detach().to(torch.float64) for v in metrics.values()]).tolist()
    return dict(zip(metrics, values))


def pmd_tau(config: ActorConfig | None) -> float:
    """τ of the opmd loss: `config.policy_loss.pmd_tau` (1.0 for None); ValueError if ≤ 0."""
    tau = DEFAULT_PMD_TAU if config is None else float(config.policy_loss.pmd_tau)
    if not tau > 0:
        raise ValueError(f"actor.policy_loss.pmd_tau must be > 0, got {tau}")
    return tau


def sum_norm_length(response_mask: torch.Tensor, max_response_length: int | None) -> int:
    """L_max of `seq-mean-token-sum-norm`: `max_response_length`, else the mask width.

    ValueError if the mask is wider than `max_response_length` (a response longer than the
    configured length means the wrong length was passed).
    """
    width = response_mask.shape[-1]
    if max_response_length is None:
        return width
    if max_response_length < max(width, 1):
        raise ValueError(f"max_response_length {max_response_length} is below the batch's response width "
                         f"{width}: pass generator.response_length")
    return int(max_response_length)


def clip_ratio_c(config: ActorConfig | None) -> float:
    """verl's dual-clip bound `policy_loss.clip_ratio_c` (3.0 for None); ValueError unless > 1."""
    c = DEFAULT_CLIP_RATIO_C if config is None else float(config.policy_loss.clip_ratio_c)
    if not c > 1:
        raise ValueError(f"actor.policy_loss.clip_ratio_c must be > 1, got {c}")
    return c


def clip_ratios(config: ActorConfig | None) -> tuple[float, float]:
    """(low, high) PPO clip ratios; each defaults to `clip_ratio` when unset."""
    if config is None:
        return DEFAULT_CLIP_RATIO, DEFAULT_CLIP_RATIO
    pl = config.policy_loss
    low = pl.clip_ratio if pl.clip_ratio_low is None else pl.clip_ratio_low
    high = pl.clip_ratio if pl.clip_ratio_high is None else pl.clip_ratio_high
    return float(low), float(high)


# ----------------------------------------------------------------------------- losses


@register_policy_loss("opmd")
def compute_policy_loss_opmd(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: ActorConfig | None = None,
    partition_weights=None,
    rollout_is_weights=None,
    max_response_length: int | None = None,
):
    """Online PMD, the sequence-level squared loss of Kimi K1.5 Eq. (3) (arXiv:2501.12599); the seed's code.

    Per response: s_i = Σ_t (log π_θ − log π_old), a_i = mean token advantage, w_i = mean token
    partition weight (1 without weights), ρ_i = mean token rollout IS weight (1 without),
    L_i = mask length (≥ 1), ℓ_i = ρ_i · ½ τ w_i (a_i/τ − s_i)². seq-mean-token-mean:
    mean_i ℓ_i / L_i; seq-mean-token-sum-norm: mean_i ℓ_i / L_max, L_max = `max_response_length`
    (a MEAN over rows, as in the seed, unlike verl's agg_loss). Other modes: ValueError. The mean
    runs over every row of the batch, band-filtered rows included with w_i = 0, so a batch with
    B_kept of B rows in band has B_kept/B times the loss of the same kept rows alone.

    Metrics: `actor/pmd_kl` = mean_i(−s_i), the k1 estimate of the sequence-level
    KL(π_old ‖ π_θ) in nats per response (unbiased because responses were sampled from π_old);
    `actor/ppo_kl` = mean_i(−s_i / L_i), the seed's per-token figure; `actor/pg_clipfrac` and
    `actor/pg_clipfrac_lower` = 0 (no clipping; the seed reports both).
    """
    check_loss_agg_mode(loss_agg_mode, OPMD_AGG_MODES, who="opmd")
    tau = pmd_tau(config)
    dtype = _compute_dtype(log_prob)
    length = response_mask.to(dtype).sum(dim=-1).clamp(min=1)  # [B]
    seq_log_ratio = masked_row_sum(log_prob.to(dtype) - old_log_prob.to(dtype), response_mask)  # [B]
    seq_adv = masked_row_sum(advantages.to(dtype), response_mask) / length  # [B]
    seq_weight = _seq_mean(partition_weights, response_mask, length, dtype)
    seq_is_weight = _seq_mean(rollout_is_weights, response_mask, length, dtype)

    seq_loss = seq_is_weight * 0.5 * tau * seq_weight * (seq_adv / tau - seq_log_ratio) ** 2  # [B]
    if loss_agg_mode == "seq-mean-token-mean":
        loss = (seq_loss / length).mean()
    else:
        loss = seq_loss.mean() / sum_norm_length(response_mask, max_response_length)

    metrics = _to_floats({
        "actor/pg_loss": loss,
        "actor/pmd_kl": (-seq_log_ratio).mean(),
        "actor/ppo_kl": (-seq_log_ratio / length).mean(),
        "actor/seq_log_ratio_mean": seq_log_ratio.mean(),
        # The regression's target a/τ against what the policy achieved, s = log π/π_old of the sequence.
        "actor/opmd_target_abs_mean": (seq_adv / tau).abs().mean(),
        "actor/opmd_residual_abs_mean": (seq_adv / tau - seq_log_ratio).abs().mean(),
        "actor/partition_weight_mean": seq_weight.mean(),
        "actor/pg_clipfrac": torch.zeros((), dtype=dtype),
        "actor/pg_clipfrac_lower": torch.zeros((), dtype=dtype),
    })
    return loss, metrics


def _seq_mean(token_values, response_mask, length, dtype) -> torch.Tensor:
    # Per-row mean of a per-token weight over the response [B]; None means weight 1.
    if token_values is None:
        return torch.ones_like(length)
    return masked_row_sum(token_values.to(dtype), response_mask) / length


@register_policy_loss("vanilla")
def compute_policy_loss_vanilla(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: ActorConfig | None = None,
    partition_weights=None,
    rollout_is_weights=None,
    max_response_length: int | None = None,
):
    """verl's dual-clip PPO: ℓ = max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)) per token, then for A < 0
    min(ℓ, −A·c) with c = `clip_ratio_c` (arXiv:1912.09729); ρ = exp(log π_θ − log π_old).

    The per-token loss is multiplied by `rollout_is_weights` (as verl) and by `partition_weights`
    (band-filtered groups, weight 0, contribute nothing) before `agg_loss`, whose sum-norm factor
    is `max_response_length`. Metrics: `actor/pg_clipfrac` (share of tokens where the clipped
    branch is taken), `actor/pg_clipfrac_lower` (share where the dual clip binds, A < 0),
    `actor/ppo_kl` (token mean of log π_old − log π_θ), `actor/pg_loss`.
    """
    check_loss_agg_mode(loss_agg_mode, who="vanilla")
    low, high = clip_ratios(config)
    c = clip_ratio_c(config)
    dtype = _compute_dtype(log_prob)
    adv = advantages.to(dtype)
    log_ratio = (log_prob.to(dtype) - old_log_prob.to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - low, 1.0 + high)
    clip_losses = torch.maximum(unclipped, clipped)  # [B,T]
    dual = -adv * c
    pg_losses = torch.where(adv < 0, torch.minimum(clip_losses, dual), clip_losses)
    for weights in (rollout_is_weights, partition_weights):
        if weights is not None:
            pg_losses = pg_losses * weights.to(dtype)
    scale = sum_norm_length(response_mask, max_response_length) if loss_agg_mode == "seq-mean-token-sum-norm" else None
    loss = agg_loss(pg_losses, response_mask, loss_agg_mode, loss_scale_factor=scale)

    metrics = _to_floats({
        "actor/pg_loss": loss,
        "actor/pg_clipfrac": masked_mean((clipped > unclipped).to(dtype), response_mask),
        "actor/pg_clipfrac_lower": masked_mean(((clip_losses > dual) & (adv < 0)).to(dtype), response_mask),
        "actor/ppo_kl": masked_mean(-log_ratio, response_mask),
    })
    return loss, metrics
