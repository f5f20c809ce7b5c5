"""The learner's work on one rank: DeepSpeed set-up, the PMD update on a TrainBatch, weights out,
optimizer reset, checkpoints. Pure torch + DeepSpeed; `services/learner.py` wraps it in Ray actors.

Data flow of one step: `TrainBatch` (from the GroupBuffer) → `train_on_batch` on every rank (rank
r takes rows r::world_size) → `full_state_dict` on every rank (rank 0 gets the weights and
publishes them to the WeightStore).

Collectives: `init_engine`, `train_on_batch`, `full_state_dict` (ZeRO-3), `save_checkpoint` and
`load_checkpoint` must be entered by every rank, in the same order.

DeepSpeed is imported lazily, after `setup_deepspeed_env`: it picks its accelerator once, at
import, from `DS_ACCELERATOR` (on a GPU host a CPU actor would otherwise pick CUDA).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from async_pmd.algos import entropy_from_logits, get_policy_loss_fn
from async_pmd.models import to_torch_dtype

if TYPE_CHECKING:
    from async_pmd.config import ActorConfig, LearnerConfig
    from async_pmd.wire import TrainBatch

logger = logging.getLogger(__name__)

# DeepSpeed prints throughput every `steps_per_print` steps; the learner logs its own metrics.
STEPS_PER_PRINT_OFF = 10**12
# ZeRO-3 gathers parameters for `full_state_dict` in buckets of about this size, so the gathered
# copy on each rank stays bounded instead of holding the whole model twice.
GATHER_BUCKET_BYTES = 256 * 2**20


# ---------------------------------------------------------------- set-up


def find_free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for MASTER_PORT when none is configured)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_deepspeed_env(
    rank: int, world_size: int, master_port: int, use_gpu: bool = False, master_addr: str = "127.0.0.1"
) -> None:
    """Set the env DeepSpeed reads; call before anything imports deepspeed in this process.

    LOCAL_RANK is 0: under Ray each rank actor sees only its own GPU (or none). Raises
    RuntimeError if deepspeed already picked another accelerator in this process.
    """
    accelerator = "cuda" if use_gpu else "cpu"
    chosen = _chosen_accelerator()
    if chosen is not None and chosen != accelerator:
        raise RuntimeError(
            f"deepspeed was imported with accelerator {chosen!r} before setup_deepspeed_env asked for "
            f"{accelerator!r}; call setup_deepspeed_env first (DS_ACCELERATOR is read once, at import)"
        )
    os.environ["DS_ACCELERATOR"] = accelerator
    # Without these even a single process falls back to MPI discovery (and fails on mpi4py).
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
    )


def _chosen_accelerator() -> str | None:
    if "deepspeed" not in sys.modules:
        return None
    from deepspeed.accelerator import real_accelerator

    accel = real_accelerator.ds_accelerator
    return None if accel is None else accel.device_name().split(":")[0]


def ds_config(
    actor: ActorConfig, learner: LearnerConfig, world_size: int, dtype: str | torch.dtype = "float32"
) -> dict[str, Any]:
    """The DeepSpeed config: one micro-batch per step (the learner sizes its own mini-batches)."""
    dtype = to_torch_dtype(dtype)
    if dtype == torch.float16:
        raise ValueError("the learner trains in float32 or bfloat16; float16 needs loss scaling: set model.dtype")
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # DeepSpeed checks micro × accumulation × ranks == this, catching a wrong WORLD_SIZE.
        "train_batch_size": world_size,
        "gradient_clipping": actor.grad_clip,
        "zero_optimization": {"stage": learner.zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        # A client torch.optim.AdamW needs no op compile; DeepSpeed only "tests" its own optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": STEPS_PER_PRINT_OFF,
        "wall_clock_breakdown": False,
    }


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based).

    Linear warmup reaches 1 at step warmup_steps - 1 (step 0 already moves: (0+1)/warmup). After
    warmup: `constant` stays 1; `cosine` decays as ½(1 + cos(π·progress)) to 0 at `total_steps`
    and stays 0 beyond.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise ValueError(f"unknown lr_scheduler {kind!r}; expected 'constant' or 'cosine'")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def init_engine(
    model: torch.nn.Module,
    actor: ActorConfig,
    learner: LearnerConfig,
    world_size: int,
    dtype: str | torch.dtype = "float32",
    total_steps: int = 1,
    config_overrides: dict[str, Any] | None = None,
    init_method: str | None = None,
):
    """Wrap `model` in a DeepSpeed engine with AdamW and the lr schedule; joins the process group.

    `total_steps` counts optimizer steps (learner steps × mini-batches × epochs), the unit the
    schedule steps in. `config_overrides` is merged into `ds_config` one level deep (e.g.
    `{"zero_optimization": {"offload_optimizer": {...}}}`). The model is put in eval mode:
    dropout would make π_θ differ from the generator's π_old even at θ = θ_old. `init_method`
    None joins through MASTER_ADDR:MASTER_PORT (a TCPStore, which torch binds to every interface);
    `file://<path>` through a file, for ranks that share one machine.
    """
    import deepspeed

    backend = "nccl" if _chosen_accelerator() == "cuda" else "gloo"
    if init_method is None:
        deepspeed.init_distributed(dist_backend=backend)  # no-op if this process already joined
    else:  # a file rendezvous needs the rank and world size spelled out
        deepspeed.init_distributed(dist_backend=backend, init_method=init_method,
                                   rank=int(os.environ["RANK"]), world_size=world_size)
    config = _merge(ds_config(actor, learner, world_size, dtype), config_overrides or {})
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=actor.lr, betas=tuple(actor.betas), weight_decay=actor.weight_decay
    )

    def schedule(step: int) -> float:
        return lr_factor(step, actor.lr_warmup_steps, total_steps, actor.lr_scheduler)

    engine, *_ = deepspeed.initialize(
        model=model.eval(),
        optimizer=optimizer,
        config=config,
        # A callable: DeepSpeed builds it on the client optimizer, whose param_groups ZeRO shares.
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    return engine


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


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
    engine, batch: TrainBatch, actor: ActorConfig, rank: int, world_size: int, temperature: float = 1.0
) -> dict[str, float]:
    """One learner step on this rank's share of `batch` (a collective: every rank calls it).

    ppo_epochs × mini-batches optimizer steps (`plan_mini_batches`). DeepSpeed averages gradients
    over ranks, so the update follows the mean of the ranks' losses. A rank with no rows in a
    mini-batch (tiny batches) still runs forward/backward/step, on one row with its loss × 0,
    so the collectives stay matched. π_old is the rollout's behaviour log-probs unless
    `actor.recompute_old_log_prob`. Metrics are means over mini-batches and ranks; `actor/entropy`
    is the token mean over the first epoch's forwards.
    """
    if batch.batch_size == 0:
        raise ValueError("train_on_batch: empty TrainBatch")
    data = _to_torch(batch, engine.device)
    plan = plan_mini_batches(batch.uids, rank, world_size, actor.ppo_mini_batch_size, actor.ppo_epochs,
                             seed=batch.learner_step)
    if actor.recompute_old_log_prob:
        data["old_log_probs"] = _recompute_old_log_probs(engine, data, plan[0], temperature)
    loss_fn = get_policy_loss_fn(actor.policy_loss.loss_mode)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # key -> [sum, count]
    for epoch, mini_batches in enumerate(plan):
        for rows in mini_batches:
            step_metrics = _train_mini_batch(engine, data, rows, actor, loss_fn, temperature, epoch == 0)
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


def _train_mini_batch(engine, data, rows, actor, loss_fn, temperature, with_entropy):
    """forward → loss → backward → step on `rows`; returns {metric: (value, weight)}."""
    idx = _rows_or_dummy(rows)
    mb = {name: tensor[idx] for name, tensor in data.items()}
    log_probs, entropy = response_log_probs(
        engine, mb["prompts"], mb["responses"], mb["attention_mask"], temperature, with_entropy
    )
    mask = mb["response_mask"]
    loss, loss_metrics = loss_fn(
        mb["old_log_probs"], log_probs, mb["advantages"], mask,
        loss_agg_mode=actor.loss_agg_mode, config=actor, partition_weights=mb["partition_weights"],
    )
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


# ---------------------------------------------------------------- weights and optimizer


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Unsharded parameters by `named_parameters()` name of the unwrapped model, detached
    contiguous CPU clones, on rank 0; None on other ranks. Under ZeRO-3 a collective."""
    is_rank0 = _rank() == 0
    named = list(engine.module.named_parameters())
    if zero_stage < 3:  # ZeRO 0-2 keep a full copy of the parameters on every rank
        return {name: _cpu_clone(p) for name, p in named} if is_rank0 else None
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for bucket in _buckets(named, GATHER_BUCKET_BYTES):
        with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
            if is_rank0:
                state.update({name: _cpu_clone(p) for name, p in bucket})
    return state if is_rank0 else None


def _cpu_clone(p: torch.Tensor) -> torch.Tensor:
    return p.detach().to("cpu", copy=True).contiguous()


def _buckets(named, max_bytes: int):
    bucket, size = [], 0
    for name, p in named:
        nbytes = getattr(p, "ds_numel", p.numel()) * p.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, p))
        size += nbytes
    if bucket:
        yield bucket


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO 1-3 and bf16 wrap it in `.optimizer`)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def reset_optimizer_state(engine) -> int:
    """Zero Adam's exp_avg, exp_avg_sq and step in place on this rank; returns tensors zeroed.

    In place, so the buffers (and a GPU's memory layout) stay; the next step restarts Adam's
    bias correction from step 1. Rank-local: every rank calls it for its own shard.
    """
    count = 0
    for state in base_optimizer(engine).state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()
                count += 1
    return count


# ---------------------------------------------------------------- checkpoints and export


CHECKPOINT_TAG = "state"


def save_checkpoint(engine, directory: str | os.PathLike, client_state: dict) -> None:
    """Model, optimizer, lr schedule and `client_state` under `directory/state` (all ranks)."""
    engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state=client_state)


def load_checkpoint(engine, directory: str | os.PathLike) -> dict:
    """Restore what `save_checkpoint` wrote (all ranks); returns its client_state.

    Raises FileNotFoundError when `directory` holds no checkpoint.
    """
    if not (Path(directory) / CHECKPOINT_TAG).is_dir():
        raise FileNotFoundError(f"no learner checkpoint under {str(directory)!r} (expected {CHECKPOINT_TAG}/)")
    path, client_state = engine.load_checkpoint(
        str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {str(directory)!r}")
    return client_state


class _WithStateDict:
    """Lets `models.save_model` (atomic directory write) save gathered weights: under ZeRO-3 the
    module's own parameters are empty placeholders."""

    def __init__(self, module, state_dict):
        self._module, self._state_dict = module, state_dict

    def save_pretrained(self, directory):
        self._module.save_pretrained(directory, state_dict=self._state_dict)


def export_hf(engine, zero_stage: int, out_dir: str | os.PathLike, tokenizer=None) -> Path | None:
    """Write the policy as a Hugging Face directory from rank 0 (a collective under ZeRO-3);
    returns the path on rank 0, None elsewhere."""
    from async_pmd.models import save_model

    state = full_state_dict(engine, zero_stage)
    if state is None:
        return None
    return save_model(_WithStateDict(engine.module, state), tokenizer, out_dir)
