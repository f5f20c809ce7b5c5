"""Generator: a Ray Serve deployment of inference-engine replicas (torch on CPU, SGLang on GPU).

Takes `GenerationRequest` bytes from the RolloutDriver and returns `RolloutBatch` bytes (one
group of `n` responses per prompt, each tagged with the policy version that sampled it; the
sampling log-probs are π_old of the PMD loss). Weights flow by pull: a replica loads the newest
published weights in `__init__` (so a replica added by scaling is current before Serve routes to
it) and checks the WeightStore's version before each batch, loading newer weights between
batches, never during one.

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

from async_pmd import names, telemetry, wire
from async_pmd.config import GeneratorConfig, ModelConfig
from async_pmd.engines import SamplingParams, create_engine, engine_options
from async_pmd.models import load_tokenizer

logger = logging.getLogger(__name__)


@serve.deployment(name=names.GENERATOR_DEPLOYMENT)
class Generator:
    """One replica: an engine, its tokenizer (for response texts), and a handle on the store."""

    def __init__(self, *, generator: GeneratorConfig, model: ModelConfig, max_prompt_length: int,
                 namespace: str, max_weight_bytes: int, max_wire_bytes: int):
        self._cfg = generator
        self._max_weight_bytes = max_weight_bytes
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
                       "weight_pull_s": 0.0, "generate_s": 0.0}
        self._metrics = telemetry.RoleMetrics("generator", replica=serve.get_replica_context().replica_tag)
        version, refs = ray.get(self._store.latest.remote())
        if refs:
            # In a worker thread: the SGLang engine refuses blocking calls on its own loop's thread.
            with ThreadPoolExecutor(1) as pool:
                pool.submit(self._load, version, ray.get(refs[0])).result()
        self._start_version = self._engine.version  # what a replica added by scaling started on
        self._metrics.set("up", 1)
        self._metrics.set("policy_version", self._engine.version)

    @telemetry.tracked
    async def generate(self, request: bytes | np.ndarray) -> np.ndarray:
        """RolloutBatch bytes for one GenerationRequest (SegmentBatch bytes for a rows-mode one)."""
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
        self._stats["requests"] += 1
        self._metrics.sync({"tokens_total": self._stats["tokens"], "responses_total": self._stats["responses"]})
        return wire.encode_array(batch, max_bytes=self._max_wire_bytes)

    def policy_version(self) -> int:
        return self._engine.version

    def pid(self) -> int:
        return os.getpid()

    def status(self) -> dict:
        return {**self._stats, "pid": os.getpid(), "policy_version": self._engine.version,
                "start_version": self._start_version, "busy": self._engine_lock.locked()}

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
        version = await self._store.version.remote()
        if version <= self._engine.version:
            return
        version, refs = await self._store.latest.remote()
        if refs:
            await asyncio.to_thread(self._load, version, await refs[0])

    def _load(self, version: int, payload: np.ndarray) -> None:
        start = time.perf_counter()
        msg = wire.decode(payload, max_bytes=self._max_weight_bytes, expect=wire.NamedTensors)
        self._engine.update_weights(msg.to_torch(), version)
        self._stats["weight_pulls"] += 1
        self._stats["weight_pull_s"] += time.perf_counter() - start
        self._metrics.observe("weight_pull_seconds", time.perf_counter() - start)
        self._metrics.set("policy_version", version)
