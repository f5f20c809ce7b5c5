"""The PMD update of one learner rank on a TrainBatch: teacher-forced log-probs, the mini-batch
plan, forward → loss → backward → step, metrics averaged over ranks. `async_pmd.ds_engine` builds
the DeepSpeed engine this runs on; `services/learner.py` wraps both in Ray actors.

Data flow of one step: `TrainBatch` (from the GroupBuffer) → `train_on_batch` on every rank (rank
r takes rows r::world_size; a collective: every rank calls it, in the same order).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
import torch

from async_pmd.algos import compute_rollout_correction, entropy_from_logits, get_policy_loss_fn

if TYPE_CHECKING:
    from async_pmd.config import ActorConfig
    from async_pmd.wire import TrainBatch


# ---------------------------------------------------------------- forward


def response_log_probs(
    model, prompts: torch.Tensor, responses: torch.Tensor, attention_mask: torch.Tensor,
    temperature: float = 1.0, with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log π(response token | prefix): (log_probs [B,R], entropy [B,R] or None).

    prompts [B,P] left-padded, responses [B,R] right-padded, attention_mask [B,P+R]. Positions
    are cumsum(mask) - 1 (pads share position 0), as the torch engine numbers them when sampling.
    The logit at position P-1+t predicts response token t; it is divided by `temperature`
    (T <= 0, greedy, is left untempered: the engine's convention) and taken in float32, so at
    θ = θ_old this equals the sampler's log-probs when top-k/top-p are off. `model` is a
    transformers causal LM or a DeepSpeed engine around one. Entropy is of the tempered
    distribution, without gradient. Values at padding positions are meaningless; mask them.
    """
    response_len = responses.shape[1]
    input_ids = torch.cat([prompts, responses], dim=1).long()  # (B, P+R)
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P+R)
    # logits_to_keep=R+1 keeps positions P-1 .. P+R-1 (the last predicts past the response);
    # the slice below is right whether or not the model honoured it.
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        use_cache=False, logits_to_keep=response_len + 1,
    )
    logits = out.logits[:, -(response_len + 1) : -1, :].float()  # (B, R, V)
    if temperature > 0:
        logits = logits / temperature
    targets = responses.long().unsqueeze(-1)  # (B, R, 1)
    log_probs = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, R)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())
    return log_probs, entropy


# ---------------------------------------------------------------- mini-batch plan


def plan_mini_batches(
    uids: list[str], rank: int, world_size: int, groups_per_mini_batch: int | None, epochs: int, seed: int
) -> list[list[np.ndarray]]:
    """Row indices this rank trains on: plan[epoch][mini_batch] -> int64 array (may be empty).

    Every rank builds the same global split: the groups (rows sharing a uid) are shuffled per
    epoch by a generator seeded with `seed` and cut into mini-batches of `groups_per_mini_batch`
    groups (None = all; the last may be smaller); then rank r keeps the rows i ≡ r (mod
    world_size) of each. So all ranks take the same number of optimizer steps, and a global
    mini-batch is exactly the chosen groups, spread over the ranks.
    """
    group_of_row = _group_index(uids)  # (B,) group id per row
    num_groups = int(group_of_row.max()) + 1 if len(uids) else 0
    per_mb = groups_per_mini_batch or max(1, num_groups)
    rng = np.random.default_rng(seed)
    mine = np.arange(len(uids)) % world_size == rank
    plan = []
    for _ in range(epochs):
        order = rng.permutation(num_groups)
        chunks = [order[i : i + per_mb] for i in range(0, max(1, num_groups), per_mb)]
        plan.append([np.flatnonzero(np.isin(group_of_row, chunk) & mine) for chunk in chunks])
    return plan


def _group_index(uids: list[str]) -> np.ndarray:
    index: dict[str, int] = {}
    return np.array([index.setdefault(u, len(index)) for u in uids], dtype=np.int64)


# ---------------------------------------------------------------- training


_TENSOR_FIELDS = ("prompts", "responses", "response_mask", "attention_mask", "old_log_probs", "advantages",
                  "partition_weights")


def _to_torch(batch: TrainBatch, device: torch.device) -> dict[str, torch.Tensor]:
    # The wire arrays are read-only views of the message buffer: copy before torch owns them.
    return {name: torch.tensor(np.array(getattr(batch, name)), device=device) for name in _TENSOR_FIELDS}


def train_on_batch(
    engine, batch: TrainBatch, actor: ActorConfig, rank: int, world_size: int, temperature: float = 1.0,
    max_response_length: int | None = None,
) -> dict[str, float]:
    """One learner step on this rank's share of `batch` (a collective: every rank calls it).

    ppo_epochs × mini-batches optimizer steps (`plan_mini_batches`). DeepSpeed averages gradients
    over ranks, so the update follows the mean of the ranks' losses. A rank with no rows in a
    mini-batch (tiny batches) still runs forward/backward/step, on one row with its loss × 0,
    so the collectives stay matched. π_old is the rollout's behaviour log-probs unless
    `actor.recompute_old_log_prob`. Every step reports the mismatch between the engine's and the
    learner's log-probs of the trained tokens (`rollout_corr/*`); with `actor.rollout_is` the
    truncated importance weights between them multiply the loss (verl's rollout correction).
    `max_response_length` is L_max of `seq-mean-token-sum-norm` (the configured response length).
    Metrics are means over mini-batches and ranks; `actor/entropy` is the token mean over the
    first epoch's forwards.
    """
    if batch.batch_size == 0:
        raise ValueError("train_on_batch: empty TrainBatch")
    data = _to_torch(batch, engine.device)
    plan = plan_mini_batches(batch.uids, rank, world_size, actor.ppo_mini_batch_size, actor.ppo_epochs,
                             seed=batch.learner_step)
    data["rollout_log_probs"] = data["old_log_probs"]  # the engine's, whatever π_old becomes
    if actor.recompute_old_log_prob:
        data["old_log_probs"] = _recompute_old_log_probs(engine, data, plan[0], temperature)
    loss_fn = get_policy_loss_fn(actor.policy_loss.loss_mode)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # key -> [sum, count]
    for epoch, mini_batches in enumerate(plan):
        for rows in mini_batches:
            step_metrics = _train_mini_batch(engine, data, rows, actor, loss_fn, temperature, epoch == 0,
                                             max_response_length)
            for key, (value, weight) in step_metrics.items():
                totals[key][0] += value * weight
                totals[key][1] += weight
    metrics = _mean_over_ranks(totals, engine.device, world_size)
    metrics["actor/num_optimizer_steps"] = float(sum(len(mbs) for mbs in plan))
    return metrics


def _recompute_old_log_probs(engine, data, first_epoch, temperature) -> torch.Tensor:
    old = data["old_log_probs"].clone()
    with torch.no_grad():
        for rows in first_epoch:
            idx = _rows_or_dummy(rows)
            log_probs, _ = response_log_probs(
                engine, data["prompts"][idx], data["responses"][idx], data["attention_mask"][idx], temperature
            )
            if len(rows):
                old[rows] = log_probs.to(old.dtype)
    return old


def _rows_or_dummy(rows: np.ndarray) -> torch.Tensor:
    # Row 0 of the batch stands in for an empty share; its loss is multiplied by 0.
    return torch.as_tensor(rows if len(rows) else np.zeros(1, dtype=np.int64))


def _train_mini_batch(engine, data, rows, actor, loss_fn, temperature, with_entropy, max_response_length):
    """forward → loss → backward → step on `rows`; returns {metric: (value, weight)}."""
    idx = _rows_or_dummy(rows)
    mb = {name: tensor[idx] for name, tensor in data.items()}
    log_probs, entropy = response_log_probs(
        engine, mb["prompts"], mb["responses"], mb["attention_mask"], temperature, with_entropy
    )
    mask = mb["response_mask"]
    # The learner's side of the engine/learner mismatch: π_old itself when recomputed, else π_θ.
    learner = mb["old_log_probs"] if actor.recompute_old_log_prob else log_probs.detach()
    is_weights, correction_metrics = compute_rollout_correction(learner, mb["rollout_log_probs"], mask, actor)
    loss, loss_metrics = loss_fn(
        mb["old_log_probs"], log_probs, mb["advantages"], mask,
        loss_agg_mode=actor.loss_agg_mode, config=actor, partition_weights=mb["partition_weights"],
        rollout_is_weights=is_weights, max_response_length=max_response_length,
    )
    loss_metrics = {**loss_metrics, **correction_metrics}
    real = 1.0 if len(rows) else 0.0
    lr = engine.get_lr()[0]  # the lr this step applies (the scheduler advances inside step)
    engine.backward(loss * real)
    grad_norm = _step(engine)

    metrics = {key: (value, real) for key, value in loss_metrics.items()}
    lengths = mask.sum(-1).clamp(min=1)
    metrics.update({
        "actor/loss": (loss.item(), real),
        "actor/partition_weight_mean": (((mb["partition_weights"] * mask).sum(-1) / lengths).mean().item(), real),
        "actor/grad_norm": (grad_norm, 1.0),
        "actor/lr": (lr, 1.0),
    })
    if entropy is not None:
        tokens = mask.sum().item() * real
        metrics["actor/entropy"] = ((entropy * mask).sum().item() / max(tokens, 1.0), tokens)
    return metrics


def _step(engine) -> float:
    """engine.step(); returns the global grad norm before clipping."""
    # ZeRO-0 in fp32 clips without recording the norm, so measure it here (grads are reduced).
    fallback = _module_grad_norm(engine) if engine.zero_optimization_stage() == 0 else None
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm if norm is not None else fallback)


def _module_grad_norm(engine) -> float:
    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0


def _mean_over_ranks(totals: dict[str, list[float]], device, world_size: int) -> dict[str, float]:
    keys = sorted(totals)
    sums = torch.tensor([[totals[k][0], totals[k][1]] for k in keys], dtype=torch.float64, device=device)
    if world_size > 1:
        torch.distributed.all_reduce(sums)  # every rank holds the same keys: the same loss fn ran
    return {k: (s / c if c > 0 else 0.0) for k, (s, c) in zip(keys, sums.tolist())}
