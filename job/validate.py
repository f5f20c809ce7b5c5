"""Validation: the val split sampled at the weights the generators serve now (verl's `_validate`).

The requests go straight to the Generator and RewardScorer deployments (the Generator alone when
it scores: `ClusterConfig.score_in_generator`), never through the
RolloutDriver or the GroupBuffer: the data cursor, the buffer, and the learner's weights and
optimizer are untouched, and training rollouts keep flowing meanwhile. The pure parts (request
building, the `val/*` metrics) are `async_pmd.validation`.
"""

from __future__ import annotations

import time

from async_pmd import telemetry, validation, wire
from async_pmd.config import ClusterConfig
from async_pmd.data import configured_source
from job.deploy import generator_handle, scorer_handle


class Validator:
    """Owns the val split (built once, in one fixed order) and the `async_pmd_val_*` gauges."""

    def __init__(self, cfg: ClusterConfig, tokenizer):
        self._cfg = cfg
        source = configured_source(cfg.data, tokenizer, split="val")  # bad val data fails here, before step 1
        self._prompts = source.next_batch(len(source))
        self._gauges = telemetry.RoleMetrics("val")

    def due(self, step: int, total_steps: int) -> bool:
        """Every `trainer.test_freq` steps and at the last one."""
        freq = self._cfg.trainer.test_freq
        return bool(freq) and (step % freq == 0 or step == total_steps)

    def run(self, step: int) -> dict:
        start = time.perf_counter()
        cfg = self._cfg
        requests = validation.build_requests(
            self._prompts, sampling=validation.val_sampling(cfg.generator.val_kwargs),
            prompts_per_request=cfg.generator.prompts_per_request, tag=f"val{step}")
        generator = generator_handle()
        scorer = None if cfg.score_in_generator else scorer_handle()
        # All requests go out before any result is awaited, so every replica can work on them.
        responses = [generator.generate.remote(wire.encode_array(r)) for r in requests]
        if scorer is not None:
            responses = [scorer.score.remote(r) for r in responses]
        groups = [g for response in responses for g in wire.decode(
            response.result(timeout_s=cfg.generator.request_timeout_s),
            max_bytes=cfg.wire.max_bytes, expect=wire.ScoredBatch).groups]
        metrics = validation.summarize(groups)
        for gauge, key in validation.GAUGES.items():
            self._gauges.set(gauge, metrics[key])
        metrics["timing/val_s"] = time.perf_counter() - start
        return metrics
