"""The PMD update of one learner rank on a TrainBatch: teacher-forced log-probs, the mini-batch and
micro-batch plan, forward → loss → backward per micro-batch → one step per mini-batch, metrics
averaged over ranks. `async_pmd.ds_engine` builds the DeepSpeed engine this runs on;
`services/learner.py` wraps both in Ray actors.

Data flow of one step: `TrainBatch` (from the GroupBuffer) → `train_on_batch` on every rank (rank
r takes rows r::world_size; a collective: every rank calls it, in the same order). Each rank cuts
its share of a mini-batch into micro-batches (`actor.ppo_micro_batch_size_per_gpu` rows, or
`actor.ppo_max_token_len_per_gpu` tokens with `actor.use_dynamic_bsz`), accumulates their
gradients and steps once; each micro-batch's loss is weighted (`algos.losses.micro_batch_share`)
so the accumulated gradient is exactly that of the whole mini-batch in one forward. The loss is
the policy loss, plus `kl_loss_coef` × the KL to a frozen reference policy (`actor.use_kl_loss`),
minus `entropy_coeff` × the entropy (verl's actor).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
import torch

from async_pmd.algos import (
    agg_loss,
    compute_kl_loss,
    compute_rollout_correction,
    entropy_from_logits,
    get_policy_loss_fn,
)
from async_pmd.algos.losses import ROW_MEAN_LOSSES, micro_batch_share, sum_norm_length

if TYPE_CHECKING:
    from async_pmd.config import ActorConfig
    from async_pmd.wire import TrainBatch


# ---------------------------------------------------------------- forward


def response_log_probs(
    model, prompts: torch.Tensor, responses: torch.Tensor, attention_mask: torch.Tensor,
    temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log π(response token | prefix): (log_probs [B,R], entropy [B,R] or None).

    prompts [B,P] left-padded, responses [B,R] right-padded, attention_mask [B,P+R]. Positions
    are cumsum(mask) - 1 (pads share position 0), as the torch engine numbers them when sampling.
    The logit at position P-1+t predicts response token t; it is divided by `temperature`
    (T <= 0, greedy, is left untempered: the engine's convention) and taken in float32, so at
    θ = θ_old this equals the sampler's log-probs when top-k/top-p are off. `model` is a
    transformers causal LM or a DeepSpeed engine around one. Entropy is of the tempered
    distribution, without gradient unless `entropy_grad` (the entropy bonus). Values at padding
    positions are meaningless; mask them.
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
    if entropy_grad:
        entropy = entropy_from_logits(logits)
    elif with_entropy:
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


# ---------------------------------------------------------------- micro-batch plan


def row_extents(
    attention_mask: np.ndarray, response_mask: np.ndarray, prompt_width: int
) -> tuple[np.ndarray, np.ndarray]:
    """(prompt columns [B], response columns [B]) each row occupies: prompts are left-padded, so a
    row's prompt spans its last `p` prompt columns; responses are right-padded, so its first `r`."""
    prompt_on = attention_mask[:, :prompt_width] > 0  # (B, P)
    response_on = (attention_mask[:, prompt_width:] > 0) | (response_mask > 0)  # (B, R)
    prompt = np.where(prompt_on.any(1), prompt_width - prompt_on.argmax(1), 0)
    last = response_on.shape[1] - response_on[:, ::-1].argmax(1)
    return prompt.astype(np.int64), np.where(response_on.any(1), last, 0).astype(np.int64)


def split_micro_batches(
    rows: np.ndarray, prompt_len: np.ndarray, response_len: np.ndarray,
    micro_batch_size: int | None = None, max_token_len: int | None = None,
) -> list[np.ndarray]:
    """Cut one rank's mini-batch `rows` into micro-batches (an empty mini-batch gives none).

    `max_token_len`: rows sorted longest first (ties by position), packed greedily in that order
    while rows × (longest prompt + longest response) stays within the budget, the padded size of
    the micro-batch's forward; a row over the budget alone forms its own micro-batch. Else
    `micro_batch_size` rows at a time in plan order; both None: the whole mini-batch.
    """
    if not len(rows):
        return []
    if max_token_len is None:
        size = micro_batch_size or len(rows)
        return [rows[i : i + size] for i in range(0, len(rows), size)]
    order = rows[np.argsort(-(prompt_len[rows] + response_len[rows]), kind="stable")]
    out, current, p_max, r_max = [], [], 0, 0
    for row in order:
        p, r = max(p_max, prompt_len[row]), max(r_max, response_len[row])
        if current and (len(current) + 1) * (p + r) > max_token_len:
            out.append(np.array(current, dtype=np.int64))
            current, p, r = [], prompt_len[row], response_len[row]
        current.append(row)
        p_max, r_max = p, r
    out.append(np.array(current, dtype=np.int64))
    return out


def plan_micro_batches(
    uids: list[str], prompt_len: np.ndarray, response_len: np.ndarray, rank: int, world_size: int,
    actor: ActorConfig, seed: int,
) -> list[list[list[np.ndarray]]]:
    """plan[epoch][mini_batch][micro_batch] -> this rank's rows (an empty array = a dummy micro-batch).

    Every rank plans every rank's split (they all hold the whole batch), so without communicating
    they agree on the micro-batch count of each mini-batch, the largest of any rank's (at least 1):
    a rank with fewer pads with dummies, and every rank runs the same forwards, backwards and steps.
    """
    by_rank = [plan_mini_batches(uids, r, world_size, actor.ppo_mini_batch_size, actor.ppo_epochs, seed)
               for r in range(world_size)]
    size = None if actor.use_dynamic_bsz else actor.ppo_micro_batch_size_per_gpu
    budget = actor.ppo_max_token_len_per_gpu if actor.use_dynamic_bsz else None

    def split(rows):
        return split_micro_batches(rows, prompt_len, response_len, size, budget)

    plan = []
    for epoch, mini_batches in enumerate(by_rank[rank]):
        epoch_plan = []
        for m, rows in enumerate(mini_batches):
            count = max(1, *(len(split(p[epoch][m])) for p in by_rank))
            mine = split(rows)
            epoch_plan.append(mine + [np.zeros(0, np.int64)] * (count - len(mine)))
        plan.append(epoch_plan)
    return plan


# ---------------------------------------------------------------- training


_TENSOR_FIELDS = ("prompts", "responses", "response_mask", "attention_mask", "old_log_probs", "advantages",
                  "partition_weights")


def _to_torch(batch: TrainBatch, device: torch.device) -> dict[str, torch.Tensor]:
    # The wire arrays are read-only views of the message buffer: copy once (np.array), and let
    # torch share that copy (as_tensor; torch.tensor would copy a second time).
    return {name: torch.as_tensor(np.array(getattr(batch, name)), device=device) for name in _TENSOR_FIELDS}


def train_on_batch(
    engine, batch: TrainBatch, actor: ActorConfig, rank: int, world_size: int, temperature: float = 1.0,
    max_response_length: int | None = None, reference: torch.nn.Module | None = None,
) -> dict[str, float]:
    """One learner step on this rank's share of `batch` (a collective: every rank calls it).

    ppo_epochs × mini-batches optimizer steps (`plan_mini_batches`), each over the same number of
    micro-batches on every rank (`plan_micro_batches`). DeepSpeed averages gradients over ranks, so
    the update follows the mean of the ranks' losses. A rank with no rows in a micro-batch (tiny
    batches) still runs forward/backward, on one row with its loss × 0, so the collectives stay
    matched. π_old is the rollout's behaviour log-probs unless `actor.recompute_old_log_prob`.
    Every step reports the mismatch between the engine's and the learner's log-probs of the
    trained tokens (`rollout_corr/*`); with `actor.rollout_is` the truncated importance weights
    between them multiply the loss (verl's rollout correction). `max_response_length` is L_max of
    `seq-mean-token-sum-norm` (the configured response length; None = the batch's response width).
    `reference` is the frozen π_ref of `actor.use_kl_loss` (ValueError if that is on and it is None).
    Metrics are means over mini-batches and ranks; `actor/loss`, `actor/pg_loss`, `actor/kl_loss`
    and `actor/entropy_loss` are the mini-batch's exact terms, other loss metrics row-weighted
    means over its micro-batches; `actor/entropy` is the token mean over the first epoch's forwards.
    """
    if batch.batch_size == 0:
        raise ValueError("train_on_batch: empty TrainBatch")
    if actor.use_kl_loss and reference is None:
        raise ValueError("actor.use_kl_loss is on but no reference policy was given (reference=)")
    data = _to_torch(batch, engine.device)
    extents = row_extents(np.asarray(batch.attention_mask), np.asarray(batch.response_mask), batch.prompts.shape[1])
    plan = plan_micro_batches(batch.uids, *extents, rank, world_size, actor, seed=batch.learner_step)
    data["rollout_log_probs"] = data["old_log_probs"]  # the engine's, whatever π_old becomes
    if actor.recompute_old_log_prob:
        data["old_log_probs"] = _score_rows(engine, data, extents, plan[0], temperature, data["old_log_probs"])
    if actor.use_kl_loss:
        data["ref_log_probs"] = _score_rows(reference, data, extents, plan[0], temperature,
                                            torch.zeros_like(data["old_log_probs"]))
    loss_fn = get_policy_loss_fn(actor.policy_loss.loss_mode)
    # L_max of sum-norm is fixed for the whole batch: micro-batches are cut to their own widths.
    sum_norm = actor.loss_agg_mode == "seq-mean-token-sum-norm"
    norm_length = sum_norm_length(data["response_mask"], max_response_length) if sum_norm else None
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # key -> [sum, count]
    for epoch, mini_batches in enumerate(plan):
        for micro_batches in mini_batches:
            step_metrics = _train_mini_batch(engine, data, extents, micro_batches, actor, loss_fn, temperature,
                                             epoch == 0, norm_length)
            for key, (value, weight) in step_metrics.items():
                totals[key][0] += value * weight
                totals[key][1] += weight
    metrics = _mean_over_ranks(totals, engine.device, world_size)
    metrics["actor/num_optimizer_steps"] = float(sum(len(mbs) for mbs in plan))
    metrics["actor/num_micro_batches"] = float(sum(len(micro) for mbs in plan for micro in mbs))
    return metrics


def _score_rows(model, data, extents, first_epoch, temperature, into: torch.Tensor) -> torch.Tensor:
    # log-probs of every row of this rank, micro-batch by micro-batch (dummies too: under ZeRO-3
    # every forward of the engine is a collective); positions past a row's micro-batch keep `into`.
    out = into.clone()
    with torch.no_grad():
        for micro_batches in first_epoch:
            for rows in micro_batches:
                mb = micro_batch(data, rows, *extents)
                log_probs, _ = response_log_probs(model, mb["prompts"], mb["responses"], mb["attention_mask"],
                                                  temperature)
                if len(rows):
                    out[torch.as_tensor(rows), : log_probs.shape[1]] = log_probs.to(out.dtype)
    return out


def _rows_or_dummy(rows: np.ndarray) -> torch.Tensor:
    # Row 0 of the batch stands in for an empty share; its loss is multiplied by 0.
    return torch.as_tensor(rows if len(rows) else np.zeros(1, dtype=np.int64))


_PROMPT_SIDE = ("prompts",)  # [B,P]; attention_mask is [B,P+R]; every other field is per response token, [B,R]


def micro_batch(data: dict[str, torch.Tensor], rows: np.ndarray, prompt_len: np.ndarray,
                response_len: np.ndarray) -> dict[str, torch.Tensor]:
    """The tensors of `rows` (row 0 for a dummy), cut to the columns these rows use: the longest
    prompt's from the left, the longest response's from the right (at least one of each)."""
    idx = _rows_or_dummy(rows)
    width = data["prompts"].shape[1]
    keep_p = max(1, int(prompt_len[idx.numpy()].max()))
    keep_r = max(1, int(response_len[idx.numpy()].max()))
    mb = {}
    for name, tensor in data.items():
        tensor = tensor[idx]
        if name in _PROMPT_SIDE:
            mb[name] = tensor[:, width - keep_p:]  # (b, keep_p)
        elif name == "attention_mask":
            mb[name] = tensor[:, width - keep_p: width + keep_r]  # (b, keep_p + keep_r)
        else:
            mb[name] = tensor[:, :keep_r]  # (b, keep_r)
    return mb


def micro_batch_loss(
    model, mb: dict[str, torch.Tensor], whole_mask: torch.Tensor, actor: ActorConfig, loss_fn,
    temperature: float = 1.0, with_entropy: bool = False, norm_length: int | None = None, real: bool = True,
) -> tuple[torch.Tensor, dict[str, float], dict[str, tuple[float, float]]]:
    """Forward and loss of one micro-batch `mb` (from `micro_batch`): (loss to backward, exact terms, metrics).

    The loss is Σ_term share × term (`micro_batch_share` against `whole_mask`, this rank's response
    mask of the whole mini-batch), so that the losses of a mini-batch's micro-batches sum to the
    mini-batch's loss in one forward; × 0 for a dummy (`real` False). Terms: the policy loss
    (`actor/pg_loss`), + `kl_loss_coef` × `actor/kl_loss`, − `entropy_coeff` × `actor/entropy_loss`,
    each aggregated by `actor.loss_agg_mode` as verl's actor does; the exact terms come back already
    multiplied by their shares. Metrics are {name: (value, weight)} with row-share weights.
    """
    mode = actor.loss_agg_mode
    mask = mb["response_mask"]
    entropy_grad = actor.entropy_coeff > 0
    log_probs, entropy = response_log_probs(model, mb["prompts"], mb["responses"], mb["attention_mask"],
                                            temperature, with_entropy or entropy_grad, entropy_grad)
    # The learner's side of the engine/learner mismatch: π_old itself when recomputed, else π_θ.
    learner = mb["old_log_probs"] if actor.recompute_old_log_prob else log_probs.detach()
    is_weights, correction_metrics = compute_rollout_correction(learner, mb["rollout_log_probs"], mask, actor)
    pg_loss, loss_metrics = loss_fn(
        mb["old_log_probs"], log_probs, mb["advantages"], mask,
        loss_agg_mode=mode, config=actor, partition_weights=mb["partition_weights"],
        rollout_is_weights=is_weights, max_response_length=norm_length,
    )
    on = 1.0 if real else 0.0
    row_mean = actor.policy_loss.loss_mode in ROW_MEAN_LOSSES
    agg_share = on * micro_batch_share(mode, mask, whole_mask)
    terms = {"actor/pg_loss": on * micro_batch_share(mode, mask, whole_mask, row_mean=row_mean) * pg_loss}
    if actor.use_kl_loss:
        kl_loss, kl_metrics = compute_kl_loss(log_probs, mb["ref_log_probs"], mask, actor.kl_loss_type, mode,
                                              norm_length)
        loss_metrics.update(kl_metrics)
        terms["actor/kl_loss"] = agg_share * kl_loss
    if entropy_grad:
        scale = norm_length if mode == "seq-mean-token-sum-norm" else None
        terms["actor/entropy_loss"] = agg_share * agg_loss(entropy, mask, mode, loss_scale_factor=scale)
    loss = terms["actor/pg_loss"]
    if actor.use_kl_loss:
        loss = loss + actor.kl_loss_coef * terms["actor/kl_loss"]
    if entropy_grad:
        loss = loss - actor.entropy_coeff * terms["actor/entropy_loss"]

    row_share = on * mask.shape[0] / max(whole_mask.shape[0], 1)
    metrics = {key: (value, row_share) for key, value in {**loss_metrics, **correction_metrics}.items()
               if key not in terms}
    lengths = mask.sum(-1).clamp(min=1)
    metrics["actor/partition_weight_mean"] = (
        ((mb["partition_weights"] * mask).sum(-1) / lengths).mean().item(), row_share)
    if with_entropy:
        tokens = mask.sum().item() * on
        metrics["actor/entropy"] = ((entropy.detach() * mask).sum().item() / max(tokens, 1.0), tokens)
    return loss, {key: float(value.detach()) for key, value in terms.items()}, metrics


def _train_mini_batch(engine, data, extents, micro_batches, actor, loss_fn, temperature, with_entropy, norm_length):
    """forward → loss → backward per micro-batch, then one step; returns {metric: (value, weight)}."""
    rows = np.concatenate(micro_batches)
    whole_mask = data["response_mask"][torch.as_tensor(rows)]  # this rank's share of the mini-batch
    lr = engine.get_lr()[0]  # the lr this step applies (the scheduler advances inside step)
    exact: dict[str, float] = defaultdict(float)
    metrics: dict[str, tuple[float, float]] = {}
    for i, micro_rows in enumerate(micro_batches):
        # Gradients accumulate over the micro-batches; only the last backward reduces them for the step.
        engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
        mb = micro_batch(data, micro_rows, *extents)
        loss, terms, micro_metrics = micro_batch_loss(engine, mb, whole_mask, actor, loss_fn, temperature,
                                                      with_entropy, norm_length, real=len(micro_rows) > 0)
        engine.backward(loss)
        exact["actor/loss"] += float(loss.detach())
        for key, value in terms.items():
            exact[key] += value
        _accumulate(metrics, micro_metrics)
    grad_norm = _step(engine)

    real = 1.0 if len(rows) else 0.0
    metrics.update({key: (value, real) for key, value in exact.items()})
    metrics["actor/grad_norm"] = (grad_norm, 1.0)
    metrics["actor/lr"] = (lr, 1.0)
    if actor.use_kl_loss:
        metrics["actor/kl_coef"] = (actor.kl_loss_coef, 1.0)
    return metrics


def _accumulate(into: dict[str, tuple[float, float]], metrics: dict[str, tuple[float, float]]) -> None:
    # Weighted means of (value, weight) pairs; a key seen once keeps its pair.
    for key, (value, weight) in metrics.items():
        if key not in into:
            into[key] = (value, weight)
            continue
        old_value, old_weight = into[key]
        total = old_weight + weight
        into[key] = ((old_value * old_weight + value * weight) / total if total > 0 else 0.0, total)


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
