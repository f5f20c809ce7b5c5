"""RewardScorer: a Ray Serve deployment that scores rollout groups with the configured reward.

Takes `RolloutBatch` bytes (chained straight from a generator's response by the RolloutDriver)
and returns `ScoredBatch` bytes. A reward function that raises, hangs past `scorer.timeout_s`, or
returns a non-number or a non-finite value gives that response the status `failed:<reason>`
and score 0 (the GroupBuffer then trains or drops the group, per `buffer.on_reward_failure`); it
never fails the request. User reward code is loaded only from the path or module the config names, and every
call of it (and of `math`) runs in one of `scorer.num_workers` worker processes, so a reward that
hangs or crashes costs its own response a status, never the replica. A pure-string built-in
(`ClusterConfig.scorer_inline`) is scored in the replica's own thread: a process hop would cost
more than the whole call.
"""

from __future__ import annotations

import asyncio
import logging
import os

import numpy as np
from ray import serve

from async_pmd import names, telemetry, wire
from async_pmd.config import ScorerConfig
from async_pmd.rewards import RewardRunner

logger = logging.getLogger(__name__)


@serve.deployment(name=names.SCORER_DEPLOYMENT)
class RewardScorer:
    """One replica: a RewardRunner (worker processes with per-call timeouts, failure counters)."""

    def __init__(self, *, scorer: ScorerConfig, max_resp_len: int, max_wire_bytes: int, inline: bool = False):
        overlong = scorer.overlong_buffer
        self._inline = inline
        self._runner = RewardRunner(  # timeout_s None: calls run inline, in the caller's thread
            scorer.reward_fn, timeout_s=None if inline else scorer.timeout_s, max_workers=scorer.num_workers,
            overlong_buffer_len=overlong.len if overlong.enable else 0,
            overlong_penalty_factor=overlong.penalty_factor, max_resp_len=max_resp_len,
        )
        self._max_wire_bytes = max_wire_bytes
        self._metrics = telemetry.RoleMetrics("scorer", replica=serve.get_replica_context().replica_tag)
        self._metrics.set("up", 1)

    @telemetry.tracked
    async def score(self, rollouts: bytes | np.ndarray) -> np.ndarray:
        """ScoredBatch bytes for one RolloutBatch."""
        batch = wire.decode(rollouts, max_bytes=self._max_wire_bytes, expect=wire.RolloutBatch)
        if self._inline:  # microseconds of string comparison: a thread hop would cost more
            scored = self._score(batch.groups)
        else:  # waiting on the workers blocks: keep the replica's event loop free
            scored = await asyncio.to_thread(self._score, batch.groups)
        self._metrics.sync({"responses_total": self._runner.num_calls})
        for reason, count in dict(self._runner.failures).items():  # a copy: worker threads add to it
            self._metrics.sync({"failures_total": count}, reason=reason)
        return wire.encode_array(wire.ScoredBatch(groups=scored), max_bytes=self._max_wire_bytes)

    def status(self) -> dict:
        return {"calls": self._runner.num_calls, "failures": dict(self._runner.failures),
                "workers": len(self._runner.worker_pids()), "inline": self._inline, "pid": os.getpid()}

    def _score(self, groups: list[wire.RolloutGroup]) -> list[wire.ScoredGroup]:
        results = self._runner.score_groups([
            (g.prompt_text, g.response_texts, g.answer, dict(g.extra), [len(r) for r in g.response_ids])
            for g in groups])
        return [wire.ScoredGroup.from_rollout(g, *result) for g, result in zip(groups, results)]
