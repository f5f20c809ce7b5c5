"""Generator: a Ray Serve deployment of inference-engine replicas (torch on CPU, SGLang on GPU).

Takes `GenerationRequest` bytes from the RolloutDriver and returns `RolloutBatch` bytes (one
group of `n` responses per prompt, each tagged with the policy version that sampled it; the
sampling log-probs are π_old of the PMD loss), or `ScoredBatch` bytes when the reward is a
pure-string built-in (`ClusterConfig.score_in_generator`): scoring it here costs microseconds,
a hop to the RewardScorer costs a request. Weights flow by pull: a replica loads the newest
published weights in `__init__` (so a replica added by scaling is current before Serve routes to
it) and checks the WeightStore's version before each batch, loading newer weights between
batches, never during one. They come as a wire message in parts from the object store, or (`weight_sync.transport:
collective`) by broadcast from learner rank 0 over a group this replica opens with it, received
through the engine's own API (`init_weight_sync_group` / `update_weights_from_distributed`).

With partial rollouts on, requests come in rows mode (`GenerationRequest.rows_mode`): each row is
one response continued from prompt + its tokens so far, with its own sampling key, for at most
`generator.partial_rollout.segment_tokens` new tokens; the answer is a `SegmentBatch` back to the
driver, which keeps unfinished responses and sends complete groups on to the scorer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
from ray import serve
from ray.exceptions import ObjectLostError, RayActorError

from async_pmd import names, telemetry, wire
from async_pmd.config import GeneratorConfig, ModelConfig, ScorerConfig, WeightSyncConfig
from async_pmd.engines import SamplingParams, create_engine, engine_options
from async_pmd.models import load_tokenizer
from async_pmd.rewards import runner_for

# `async_pmd.weight_broadcast` (torch) is imported where a replica receives weights by broadcast,
# not here: the launcher loads this module to deploy the replicas, and has no use for torch.

logger = logging.getLogger(__name__)
# How long a stopping replica waits for learner rank 0 to close its weight group.
CLOSE_GROUP_TIMEOUT_S = 10.0


@serve.deployment(name=names.GENERATOR_DEPLOYMENT)
class Generator:
    """One replica: an engine, its tokenizer (for response texts), and a handle on the store."""

    def __init__(self, *, generator: GeneratorConfig, model: ModelConfig, max_prompt_length: int,
                 namespace: str, weight_sync: WeightSyncConfig, max_wire_bytes: int,
                 scorer: ScorerConfig | None = None, max_resp_len: int | None = None):
        self._cfg = generator
        # `ClusterConfig.score_in_generator`: a pure-string reward, scored here, in microseconds;
        # the answer is then a ScoredBatch and no RewardScorer hop follows.
        self._runner = runner_for(scorer, max_resp_len, inline=True) if scorer is not None else None
        self._scorer_metrics = None if scorer is None else telemetry.RoleMetrics(
            "scorer", replica=serve.get_replica_context().replica_tag)
        self._weight_sync = weight_sync
        # `collective`: (sender's actor id, group name, sender)
        self._weight_group: tuple[str, str, ray.actor.ActorHandle] | None = None
        self._max_wire_bytes = max_wire_bytes
        self._tokenizer = load_tokenizer(model.path)
        if generator.partial_rollout.enable:  # a continuation's prompt carries the response so far
            max_prompt_length += generator.response_length
        engine_kwargs = {"dtype": model.dtype, "max_prompt_length": max_prompt_length, **engine_options(generator)}
        self._engine = create_engine(generator.engine, model.path, tokenizer=self._tokenizer, **engine_kwargs)
        self._store = ray.get_actor(names.WEIGHT_STORE, namespace=namespace)
        # One batch on the engine at a time, and weight loads only between batches.
        self._engine_lock = asyncio.Lock()
        self._stats = {"requests": 0, "responses": 0, "tokens": 0, "weight_pulls": 0,
                       "weight_pull_s": 0.0, "generate_s": 0.0, "weight_groups_joined": 0}
        self._metrics = telemetry.RoleMetrics("generator", replica=serve.get_replica_context().replica_tag)
        latest = ray.get(self._store.latest.remote())
        if latest[0] >= 0:
            # In a worker thread: the SGLang engine refuses blocking calls on its own loop's thread.
            with ThreadPoolExecutor(1) as pool:
                pool.submit(self._fetch_unless_gone, latest).result()
        self._start_version = self._engine.version  # what a replica added by scaling started on
        self._metrics.set("up", 1)
        self._metrics.set("policy_version", self._engine.version)

    @telemetry.tracked
    async def generate(self, request: bytes | np.ndarray) -> np.ndarray:
        """RolloutBatch bytes for one GenerationRequest, ScoredBatch bytes when this replica scores
        (SegmentBatch bytes for a rows-mode request)."""
        req = wire.decode(request, max_bytes=self._max_wire_bytes, expect=wire.GenerationRequest)
        if req.rows_mode:
            rows = [p.tolist() + x.tolist() for p, x in zip(req.prompt_ids, req.prefix_ids)]
            params = self._segment_sampling(req)
        else:
            rows, params = [p.tolist() for p in req.prompt_ids], self._sampling(req.sampling)
        async with self._engine_lock:
            await self._pull_newer_weights()
            start = time.perf_counter()
            outputs = await asyncio.to_thread(self._engine.generate, rows, params)
            self._stats["generate_s"] += time.perf_counter() - start
            self._metrics.observe("generate_seconds", time.perf_counter() - start)
        if req.rows_mode:
            batch = self._segments(req, [outs[0] for outs in outputs])
        else:
            batch = wire.RolloutBatch(groups=[self._group(req, i, outs) for i, outs in enumerate(outputs)])
            if self._runner is not None:
                batch = wire.ScoredBatch(groups=self._runner.score_rollouts(batch.groups))
                self._scorer_metrics.sync({"responses_total": self._runner.num_calls})
        self._stats["requests"] += 1
        self._metrics.sync({"tokens_total": self._stats["tokens"], "responses_total": self._stats["responses"]})
        return wire.encode_array(batch, max_bytes=self._max_wire_bytes)

    def policy_version(self) -> int:
        return self._engine.version

    def pid(self) -> int:
        return os.getpid()

    def status(self) -> dict:
        return {**self._stats, "pid": os.getpid(), "policy_version": self._engine.version,
                "start_version": self._start_version, "busy": self._engine_lock.locked(),
                "weight_transport": self._weight_sync.transport}

    # ------------------------------------------------------------------ helpers

    def _sampling(self, overrides: dict) -> SamplingParams:
        cfg = self._cfg
        base = {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                "max_new_tokens": cfg.response_length, "n": cfg.n}
        return SamplingParams(**{**base, **overrides})

    def _segment_sampling(self, req: wire.GenerationRequest) -> SamplingParams:
        """One response per row, keyed by its row seed at its own position; no row needs more
        than the segment, nor more than the longest remaining budget (the driver trims the rest)."""
        cfg = self._cfg
        remaining = cfg.response_length - min(len(x) for x in req.prefix_ids)
        return self._sampling({**req.sampling, "n": 1, "row_seeds": tuple(req.row_seeds),
                               "start_positions": tuple(len(x) for x in req.prefix_ids),
                               "max_new_tokens": max(1, min(cfg.partial_rollout.segment_tokens, remaining))})

    def _segments(self, req: wire.GenerationRequest, outs) -> wire.SegmentBatch:
        self._stats["responses"] += len(outs)
        self._stats["tokens"] += sum(len(o.token_ids) for o in outs)
        return wire.SegmentBatch(
            uids=list(req.uids), response_indices=list(req.response_indices),
            response_ids=[np.asarray(o.token_ids, np.int32) for o in outs],
            logprobs=[np.asarray(o.logprobs, np.float32) for o in outs],
            finish_reasons=[o.finish_reason for o in outs], policy_versions=[o.policy_version for o in outs])

    def _group(self, req: wire.GenerationRequest, i: int, outs) -> wire.RolloutGroup:
        response_ids = [np.asarray(o.token_ids, np.int32) for o in outs]
        self._stats["responses"] += len(outs)
        self._stats["tokens"] += sum(len(r) for r in response_ids)
        return wire.RolloutGroup(
            uid=req.uids[i], prompt_ids=np.asarray(req.prompt_ids[i], np.int32),
            response_ids=response_ids,
            logprobs=[np.asarray(o.logprobs, np.float32) for o in outs],
            finish_reasons=[o.finish_reason for o in outs],
            policy_version=min(o.policy_version for o in outs),
            prompt_text=req.prompt_texts[i],
            response_texts=self._tokenizer.batch_decode(response_ids, skip_special_tokens=True),
            answer=req.answers[i], sample_index=req.sample_indices[i], extra=dict(req.extras[i]),
        )

    async def _pull_newer_weights(self) -> None:
        latest = await self._store.latest.remote()  # the ref comes unresolved: cheap when not newer
        if latest[0] > self._engine.version:
            await asyncio.to_thread(self._fetch_unless_gone, latest)

    def _fetch_unless_gone(self, latest: tuple) -> None:
        try:
            self._fetch(latest)
        except (RayActorError, ObjectLostError) as exc:
            # Learner rank 0 died: with it the weights it put (it owns them) or the sender it was.
            # The job rebuilds it from the checkpoint and publishes again; until then this replica
            # samples with the weights it has.
            logger.warning("weights of version %d not received, the learner is gone: %s", latest[0], exc)

    def _fetch(self, latest: tuple) -> None:
        """Load the weights `WeightStore.latest()` points at (blocking; a worker thread)."""
        version, refs, sender = latest
        start = time.perf_counter()
        if refs:
            parts = ray.get(refs[0])  # the head, then a buffer per tensor or run of tensors, views of shared memory
            msg = wire.decode(parts, max_bytes=self._weight_sync.max_bytes, expect=wire.NamedTensors)
            adopt = getattr(self._engine, "adopt_weights", None)
            if adopt is not None:  # the torch engine keeps the message's memory as its weights: no copy
                adopt(msg.to_torch(share_readonly=True), version)
            else:  # the engine may write what it is given: a copy of the read-only message first
                self._engine.update_weights(msg.to_torch(), version)
        elif sender is not None:
            self._receive(*sender)
        else:
            return
        self._stats["weight_pulls"] += 1
        self._stats["weight_pull_s"] += time.perf_counter() - start
        self._metrics.observe("weight_pull_seconds", time.perf_counter() - start)
        self._metrics.set("policy_version", self._engine.version)

    def __del__(self) -> None:
        """Serve calls this when it stops the replica (scale-down, redeploy): learner rank 0 closes
        this replica's weight group rather than keep it. (One that dies instead is found dead when
        the next replica opens a group.)"""
        joined, self._weight_group = getattr(self, "_weight_group", None), None
        if joined is not None:
            try:
                ray.get(joined[2].close_weight_group.remote(joined[1]), timeout=CLOSE_GROUP_TIMEOUT_S)
            except Exception as exc:  # the sender is gone too, or Ray is: nothing is left to close
                logger.info("weight group %s not closed on the sender: %r", joined[1], exc)

    def _receive(self, sender: ray.actor.ActorHandle, sender_id: str) -> None:
        """Receive the sender's newest weights by broadcast, joining its group first if needed."""
        from async_pmd import weight_broadcast

        group = self._join(sender, sender_id)
        try:
            manifest = ray.get(sender.reserve_weights.remote(group))
            weight_broadcast.check_dtypes(manifest["dtypes"])
            sent = sender.send_weights.remote(group)
            self._engine.update_weights_from_distributed(manifest["names"], manifest["dtypes"], manifest["shapes"],
                                                         manifest["version"], group_name=group)
            ray.get(sent)
        except Exception:
            # A broadcast that failed halfway leaves the group unusable: the next pull opens a new one.
            self._weight_group = None
            raise

    def _join(self, sender: ray.actor.ActorHandle, sender_id: str) -> str:
        from async_pmd import weight_broadcast

        if self._weight_group is not None and self._weight_group[0] == sender_id:
            return self._weight_group[1]
        if self._weight_group is not None:  # a rebuilt learner: its predecessor's group is dead
            self._engine.destroy_weight_sync_group(self._weight_group[1])
            self._weight_group = None
        world_size = 1 + self._engine.weight_sync_ranks
        address, port, group = ray.get(sender.open_weight_group.remote(
            world_size, ray.get_runtime_context().current_actor))
        self._engine.init_weight_sync_group(
            master_address=address, master_port=port, rank_offset=1, world_size=world_size, group_name=group,
            backend=weight_broadcast.backend_for(self._cfg.num_gpus > 0))
        self._weight_group = (sender_id, group, sender)
        self._stats["weight_groups_joined"] += 1
        return group
