"""The seed's (verl's) launch keys: what each one becomes here.

A user of the seed arrives with its Hydra overrides (`../shared/seed-scripts/*.overrides` are the
two example scripts' lines). Every key there has exactly one fate, looked up before validation:

- `Map`: rewritten onto our config with the same effect (`actor_rollout_ref.actor.optim.lr` ->
  `actor.lr`, `actor_rollout_ref.rollout.name` -> `generator.engine`, ...);
- `NoOp`: accepted because it has no effect here, listed once in a warning at start-up (and by
  `--print-config`); a value that *would* have an effect (e.g. `algorithm.gamma` != 1) is refused;
- `Refuse`: refused before anything starts, with the reason.

Keys not in the table fall through to the prefix aliases of `async_pmd.config` (so
`actor_rollout_ref.actor.ppo_mini_batch_size` is `actor.ppo_mini_batch_size`) and then to the
config's own validation, which refuses anything unknown by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Pairs = list[tuple[str, Any]]


@dataclass(frozen=True)
class Map:
    """Set `target` to the value (or to what `convert` makes of it: one or more (key, value))."""

    target: str | None = None
    convert: Callable[[Any], Pairs] | None = None
    note: str = ""

    def pairs(self, value: Any) -> Pairs:
        return self.convert(value) if self.convert else [(self.target, value)]


@dataclass(frozen=True)
class NoOp:
    """No effect here (`why`), for the values `accepts`; any other value is refused with `otherwise`."""

    why: str
    accepts: Callable[[Any], bool] = lambda value: True
    otherwise: str = ""


@dataclass(frozen=True)
class Refuse:
    why: str


def _one(value) -> bool:
    return value in (1, 1.0, None)


def _false(value) -> bool:
    return value in (False, None, "false", "False")


def _engine(value) -> Pairs:
    engines = {"vllm": "vllm", "sglang": "sglang", "hf": "torch", "torch": "torch"}
    if value not in engines:
        raise ValueError(f"rollout.name {value!r}: choose one of {sorted(engines)}")
    return [("generator.engine", engines[value])]


def _train_files(value) -> Pairs:
    files = [value] if isinstance(value, str) else list(value)
    suffixes = {str(f).rsplit(".", 1)[-1] for f in files}
    source = "parquet" if suffixes == {"parquet"} else "jsonl" if suffixes <= {"jsonl", "json"} else None
    return [("data.train_files", files)] + ([("data.source", source)] if source else [])


def _shard_like_parallelism(key: str) -> Map | NoOp:
    return Map(convert=lambda v: [] if _one(v) else [("learner.zero_stage", 3)],
               note=f"{key} > 1 splits a model over GPUs; here the learner shards parameters, gradients and "
                    "optimizer state over its ranks instead (ZeRO-3)")


_REF = "the reference policy is a frozen copy on each learner rank (used only with use_kl_loss); it follows the actor's settings"
_BYPASS = ("π_old is the engine's log-probs (bypass mode); with actor.recompute_old_log_prob the learner's "
           "micro-batch settings apply")
_MEGATRON_ONLY = "needs Megatron's pipeline/context-parallel schedule, which the DeepSpeed learner does not have"

SEED_KEYS: dict[str, Map | NoOp | Refuse] = {
    # algorithm
    "algorithm.gamma": NoOp("outcome rewards: no per-token discounting", _one, "γ != 1 needs token-level returns (GAE)"),
    "algorithm.lam": NoOp("no GAE: PMD uses group baselines", _one, "λ != 1 needs GAE, which PMD does not use"),
    "algorithm.use_kl_in_reward": NoOp("no KL penalty in the reward", _false,
                                       "a KL penalty in the reward is not built: use actor.use_kl_loss"),
    # data
    "data.train_files": Map(convert=_train_files),
    "data.max_response_length": Map("generator.response_length"),
    "data.filter_overlong_prompts": Map(convert=lambda v: [("data.overlong_prompts", "filter")] if v else []),
    "data.truncation": Map(convert=lambda v: {"error": [("data.overlong_prompts", "error")],
                                              "right": [("data.overlong_prompts", "truncate")]}[v]
                           if v in ("error", "right") else _refuse(f"data.truncation={v!r}: only error or right")),
    "data.return_raw_chat": NoOp("prompts are always formatted with the tokenizer's chat template here "
                                 "(data.apply_chat_template)"),
    # model
    "actor_rollout_ref.model.path": Map("model.path"),
    "actor_rollout_ref.model.enable_gradient_checkpointing": Map("model.gradient_checkpointing"),
    "actor_rollout_ref.model.use_remove_padding": NoOp("the learner packs nothing: padding is masked, results are the same"),
    "actor_rollout_ref.nccl_timeout": Map("learner.collective_timeout_s"),
    # actor (learner)
    "actor_rollout_ref.actor.optim.lr": Map("actor.lr"),
    "actor_rollout_ref.actor.optim.weight_decay": Map("actor.weight_decay"),
    "actor_rollout_ref.actor.optim.lr_warmup_steps": Map("actor.lr_warmup_steps"),
    "actor_rollout_ref.actor.fsdp_config.param_offload": Map("learner.offload_param"),
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload": Map("learner.offload_optimizer"),
    "actor_rollout_ref.actor.fsdp_config.fsdp_size": NoOp("the learner shards over all its ranks", lambda v: v == -1,
                                                          "only fsdp_size -1 (all ranks) is built"),
    "actor_rollout_ref.actor.megatron.param_offload": Map("learner.offload_param"),
    "actor_rollout_ref.actor.megatron.optimizer_offload": Map("learner.offload_optimizer"),
    "actor_rollout_ref.actor.megatron.grad_offload": Map("learner.offload_optimizer",
                                                         note="ZeRO offloads gradients with the optimizer state"),
    "actor_rollout_ref.actor.megatron.tensor_model_parallel_size": _shard_like_parallelism("tensor_model_parallel_size"),
    "actor_rollout_ref.actor.megatron.expert_model_parallel_size": _shard_like_parallelism("expert_model_parallel_size"),
    "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size": NoOp("no pipeline stages", _one, _MEGATRON_ONLY),
    "actor_rollout_ref.actor.megatron.virtual_pipeline_model_parallel_size": NoOp(
        "no pipeline stages", lambda v: v is None, _MEGATRON_ONLY),
    "actor_rollout_ref.actor.megatron.context_parallel_size": NoOp("sequences are not split", _one, _MEGATRON_ONLY),
    "actor_rollout_ref.actor.megatron.use_mbridge": NoOp("weights load from the HF directory directly"),
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size": _shard_like_parallelism("ulysses_sequence_parallel_size"),
    "actor_rollout_ref.actor.ppo_infer_max_token_len_per_gpu": NoOp(_BYPASS),
    "actor_rollout_ref.actor.policy_loss.pmd_alpha": NoOp("the seed's default scale of the opmd loss", _one,
                                                          "pmd_alpha != 1 is not in the seed's documented loss"),
    # rollout (generator)
    "actor_rollout_ref.rollout.name": Map(convert=_engine),
    "actor_rollout_ref.rollout.prompt_length": Map("data.max_prompt_length"),
    "actor_rollout_ref.rollout.tensor_model_parallel_size": Map("generator.tensor_parallel_size"),
    "actor_rollout_ref.rollout.gpu_memory_utilization": Map("generator.gpu_memory_utilization"),
    "actor_rollout_ref.rollout.enforce_eager": Map("generator.enforce_eager"),
    "actor_rollout_ref.rollout.enable_chunked_prefill": Map("generator.enable_chunked_prefill"),
    "actor_rollout_ref.rollout.max_num_batched_tokens": Map("generator.max_num_batched_tokens"),
    "actor_rollout_ref.rollout.max_model_len": Map("generator.max_model_len"),
    "actor_rollout_ref.rollout.load_format": NoOp("the engine loads model.path, then the learner's weights",
                                                  lambda v: v in ("auto", "dummy"), "only auto or dummy"),
    "actor_rollout_ref.rollout.mode": NoOp("generation is always asynchronous here (a Serve deployment)"),
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": NoOp(_BYPASS),
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu": NoOp(_BYPASS),
    # reference policy
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": NoOp(_REF),
    "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu": NoOp(_REF),
    "actor_rollout_ref.ref.fsdp_config.param_offload": NoOp(_REF),
    "actor_rollout_ref.ref.ulysses_sequence_parallel_size": NoOp(_REF),
    **{f"actor_rollout_ref.ref.megatron.{k}": NoOp(_REF) for k in (
        "param_offload", "optimizer_offload", "grad_offload", "pipeline_model_parallel_size",
        "tensor_model_parallel_size", "expert_model_parallel_size", "context_parallel_size",
        "virtual_pipeline_model_parallel_size")},
    # critic, reward model
    "critic.enable": NoOp("PMD needs no critic", _false, "a critic is not built: PMD's baselines are group statistics"),
    "critic.value_loss_type": NoOp("the critic is off"),
    "reward_model.enable": NoOp("rewards come from scorer.reward_fn", _false,
                                "a model-based reward is not built: set scorer.reward_fn"),
    "reward_model.reward_manager": NoOp("the scorer adds DAPO's overlong penalty when overlong_buffer_cfg.enable",
                                        lambda v: v in ("dapo", "naive"), "only the dapo and naive managers"),
    # trainer
    "trainer.total_training_steps": Map("trainer.total_steps"),
    "trainer.critic_warmup": NoOp("no critic", lambda v: v in (0, None), "no critic to warm up"),
    "trainer.n_gpus_per_node": NoOp("Ray places the actors on the cluster's GPUs (checked before deploying)"),
    "trainer.nnodes": NoOp("Ray places the actors on the cluster's nodes (checked before deploying)"),
}


def _refuse(message: str):
    raise ValueError(message)


@dataclass
class Report:
    """What the seed's keys of one config did: the no-ops, and the mappings worth a note."""

    noops: list[str]
    notes: list[str]

    @classmethod
    def empty(cls) -> Report:
        return cls([], [])


def resolve(key: str, value: Any, report: Report | None = None) -> Pairs:
    """Our (key, value) pairs for one seed key (none for a no-op, which goes into `report`);
    ValueError if refused. A key not in the table comes back unchanged."""
    fate = SEED_KEYS.get(key)
    if fate is None:
        return [(key, value)]
    if isinstance(fate, Refuse):
        raise ValueError(f"{key}: {fate.why}")
    if isinstance(fate, NoOp):
        if not fate.accepts(value):
            raise ValueError(f"{key}={value!r}: {fate.otherwise}")
        if report is not None:
            report.noops.append(f"{key}={value!r} has no effect here: {fate.why}")
        return []
    try:
        pairs = fate.pairs(value)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{key}={value!r}: {exc}") from None
    if fate.note and pairs and report is not None:
        report.notes.append(f"{key}={value!r} -> {', '.join(f'{k}={v!r}' for k, v in pairs)}: {fate.note}")
    return pairs


def apply_order(key: str) -> int:
    """Overrides apply in their order, but verl's prompt filter wins over its truncation policy
    (it drops the over-long prompts first, so the policy never sees one): filter goes last."""
    return 1 if key.lstrip("+") == "data.filter_overlong_prompts" else 0
