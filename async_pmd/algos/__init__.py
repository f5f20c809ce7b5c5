"""The algorithms: advantage estimators, weighted-PMD weights, policy losses, their registries,
rollout correction (engine vs learner log-probs) and the KL-loss term.

Importing this package registers the built-ins (`ploo`, `ploo_exact`, `rloo`, `partition`, `grpo`;
`opmd`, `vanilla`), so every process that resolves a name from the config imports it first.
"""

from async_pmd.algos import advantages, losses, weights  # noqa: F401  (registration on import)
from async_pmd.algos.advantages import (
    compute_grpo_advantage,
    compute_partition_advantage,
    compute_ploo_advantage,
    compute_ploo_exact_advantage,
    compute_rloo_advantage,
    group_ids,
    log_mean_exp_baseline,
    loo_log_mean_exp_baseline,
    partition_tau,
    seed_loo_baseline,
    sequence_scores,
)
from async_pmd.algos.kl import KL_TYPES, compute_kl_loss, kl_penalty
from async_pmd.algos.losses import (
    LOSS_AGG_MODES,
    OPMD_AGG_MODES,
    agg_loss,
    compute_policy_loss_opmd,
    compute_policy_loss_vanilla,
    entropy_from_logits,
    masked_mean,
    pmd_tau,
)
from async_pmd.algos.registry import (
    ADV_ESTIMATORS,
    POLICY_LOSSES,
    get_adv_estimator_fn,
    get_policy_loss_fn,
    list_adv_estimators,
    list_policy_losses,
    register_adv_est,
    register_policy_loss,
)
from async_pmd.algos.rollout_correction import (
    ROLLOUT_IS_LEVELS,
    compute_rollout_correction,
    compute_rollout_correction_weights,
    compute_rollout_mismatch_metrics,
)
from async_pmd.algos.weights import compute_wpmd_weight, group_band_mask, group_importance_weights

__all__ = [
    "ADV_ESTIMATORS",
    "KL_TYPES",
    "LOSS_AGG_MODES",
    "OPMD_AGG_MODES",
    "POLICY_LOSSES",
    "ROLLOUT_IS_LEVELS",
    "agg_loss",
    "compute_grpo_advantage",
    "compute_kl_loss",
    "compute_partition_advantage",
    "compute_ploo_advantage",
    "compute_ploo_exact_advantage",
    "compute_policy_loss_opmd",
    "compute_policy_loss_vanilla",
    "compute_rloo_advantage",
    "compute_rollout_correction",
    "compute_rollout_correction_weights",
    "compute_rollout_mismatch_metrics",
    "compute_wpmd_weight",
    "entropy_from_logits",
    "get_adv_estimator_fn",
    "get_policy_loss_fn",
    "group_band_mask",
    "group_ids",
    "group_importance_weights",
    "kl_penalty",
    "list_adv_estimators",
    "list_policy_losses",
    "log_mean_exp_baseline",
    "loo_log_mean_exp_baseline",
    "masked_mean",
    "partition_tau",
    "pmd_tau",
    "register_adv_est",
    "register_policy_loss",
    "seed_loo_baseline",
    "sequence_scores",
]
