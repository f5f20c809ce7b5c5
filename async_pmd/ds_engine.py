"""DeepSpeed plumbing of one learner rank: the process env, the policy and reference models, the
engine and its lr schedule (ZeRO stage, CPU offload), full weights out, optimizer reset,
checkpoints and export. Pure torch + DeepSpeed; the PMD update that
runs on the engine is `async_pmd.pmd_step`, and `services/learner.py` wraps both in Ray actors.

Collectives: `init_engine`, `full_state_dict` (ZeRO-3), `save_checkpoint`, `load_checkpoint` and
`export_hf` (ZeRO-3) must be entered by every rank, in the same order.

DeepSpeed is imported lazily, after `setup_deepspeed_env`: it picks its accelerator once, at
import, from `DS_ACCELERATOR` (on a GPU host a CPU actor would otherwise pick CUDA).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from async_pmd.models import to_torch_dtype

if TYPE_CHECKING:
    from async_pmd.config import ActorConfig, LearnerConfig, ModelConfig

logger = logging.getLogger(__name__)

# DeepSpeed prints throughput every `steps_per_print` steps; the learner logs its own metrics.
STEPS_PER_PRINT_OFF = 10**12
# ZeRO-3 gathers parameters for `full_state_dict` in buckets of about this size, so the gathered
# copy on each rank stays bounded instead of holding the whole model twice.
GATHER_BUCKET_BYTES = 256 * 2**20


# ---------------------------------------------------------------- set-up


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
    """The DeepSpeed config: one micro-batch per step as DeepSpeed counts them; `pmd_step` cuts its
    own mini- and micro-batches and marks the accumulation boundary itself
    (`engine.set_gradient_accumulation_boundary`), so gradient_accumulation_steps stays 1."""
    dtype = to_torch_dtype(dtype)
    if dtype == torch.float16:
        raise ValueError("the learner trains in float32 or bfloat16; float16 needs loss scaling: set model.dtype")
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # DeepSpeed checks micro × accumulation × ranks == this, catching a wrong WORLD_SIZE.
        "train_batch_size": world_size,
        "gradient_clipping": actor.grad_clip,
        "zero_optimization": _zero_section(learner),
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        # A client torch.optim.AdamW needs no op compile; DeepSpeed only "tests" its own optimizers.
        "zero_allow_untested_optimizer": True,
        # ... and with offload it also steps the offloaded fp32 weights on the host. DeepSpeedCPUAdam
        # would be several times faster there but compiles an op on first use (~100 s on 2 cores).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": STEPS_PER_PRINT_OFF,
        "wall_clock_breakdown": False,
    }


def _zero_section(learner: LearnerConfig) -> dict[str, Any]:
    # LearnerConfig has checked the stages: optimizer offload from ZeRO-1, parameter offload at ZeRO-3.
    section: dict[str, Any] = {"stage": learner.zero_stage}
    if learner.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": _chosen_accelerator() == "cuda"}
    if learner.offload_param:
        section["offload_param"] = {"device": "cpu", "pin_memory": _chosen_accelerator() == "cuda"}
    return section


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


def load_policy(model_cfg: ModelConfig) -> torch.nn.Module:
    """The policy a rank trains, from `model.path`, with `model.gradient_checkpointing` applied."""
    from async_pmd.models import load_model

    model = load_model(model_cfg.path, dtype=model_cfg.dtype)
    if model_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def load_reference(model_cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
    """π_ref of `actor.use_kl_loss`: the initial weights at `model.path`, frozen (eval, no grad).

    A plain module on this rank, outside DeepSpeed, so a resumed policy never changes it and
    ZeRO-3 does not shard it: it costs one full copy of the weights in `model.dtype` per rank.
    """
    from async_pmd.models import load_model

    return load_model(model_cfg.path, dtype=model_cfg.dtype).to(device).eval().requires_grad_(False)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations (no KV cache)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.config.use_cache = False


def _checkpointed_layers_train(model: torch.nn.Module) -> None:
    # transformers checkpoints a layer only while `layer.training`; the learner keeps the model in
    # eval mode (no dropout), so set the flag on the checkpointed layers alone: their submodules
    # (attention dropout) stay in eval mode.
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True


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
    dropout would make π_θ differ from the generator's π_old even at θ = θ_old (layers under
    gradient checkpointing get their own `training` flag, which transformers requires to
    checkpoint). `init_method`
    None joins through a TCPStore that rank 0 hosts at MASTER_ADDR:MASTER_PORT, listening on that
    address only (`async_pmd.rendezvous`); `file://<path>` through a file, for ranks that share one
    machine.
    """
    import deepspeed

    backend = "nccl" if _chosen_accelerator() == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=learner.collective_timeout_s)
    if init_method is None:
        if not torch.distributed.is_initialized():  # DeepSpeed's own env:// store would listen on [::]
            from async_pmd import rendezvous

            rank = int(os.environ["RANK"])
            store = rendezvous.tcp_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                         is_master=rank == 0, timeout_s=learner.collective_timeout_s)
            torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                                 timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts the group formed above
    else:  # a file rendezvous needs the rank and world size spelled out
        deepspeed.init_distributed(dist_backend=backend, init_method=init_method, timeout=timeout,
                                   rank=int(os.environ["RANK"]), world_size=world_size)
    config = _merge(ds_config(actor, learner, world_size, dtype), config_overrides or {})
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=actor.lr, betas=tuple(actor.betas), weight_decay=actor.weight_decay
    )

    def schedule(step: int) -> float:
        return lr_factor(step, actor.lr_warmup_steps, total_steps, actor.lr_scheduler)

    model.eval()
    _checkpointed_layers_train(model)
    engine, *_ = deepspeed.initialize(
        model=model,
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


# ---------------------------------------------------------------- weights and optimizer


def full_state_dict(engine, zero_stage: int, clone: bool = True) -> dict[str, torch.Tensor] | None:
    """Unsharded parameters by `named_parameters()` name of the unwrapped model, detached
    contiguous CPU clones, on rank 0; None on other ranks. Under ZeRO-3 a collective.

    `clone=False` (ZeRO 0-2): parameters already on the CPU come as detached views, not copies,
    for a caller that copies them itself before the next step (the object-store publish encodes
    them): one full copy of the weights fewer per sync."""
    is_rank0 = _rank() == 0
    named = list(engine.module.named_parameters())
    if zero_stage < 3:  # ZeRO 0-2 keep a full copy of the parameters on every rank
        if not is_rank0:
            return None
        return {name: _cpu_clone(p) if clone else p.detach().to("cpu").contiguous() for name, p in named}
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
