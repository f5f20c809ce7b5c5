"""RewardScorer: a Ray Serve deployment that scores rollout groups with the configured reward.

Takes `RolloutBatch` bytes (chained straight from a generator's response by the RolloutDriver)
and returns `ScoredBatch` bytes. A reward function that raises, hangs past `scorer.timeout_s`, or
returns a non-number or a non-finite value gives that response the status `failed:<reason>`
and score 0 (the GroupBuffer then trains or drops the group, per `buffer.on_reward_failure`); it
never fails the request. User reward code is loaded only from the path or module the config names, and every
call of it (and of `math`) runs in one of `scorer.num_workers` worker processes, so a reward that
hangs or crashes costs its own response a status, never the replica. A pure-string built-in
(`ClusterConfig.scorer_inline`) is scored in the generator replicas instead and this deployment is
not started (`ClusterConfig.score_in_generator`), except with partial rollouts, where the driver
assembles the groups: then it is scored here in the replica's own thread, as a process hop would
cost more than the whole call.
"""

from __future__ import annotations

import asyncio
import logging
import os

import numpy as np
from ray import serve

from async_pmd import names, telemetry, wire
from async_pmd.config import ScorerConfig
from async_pmd.rewards import runner_for

logger = logging.getLogger(__name__)


@serve.deployment(name=names.SCORER_DEPLOYMENT)
class RewardScorer:
    """One replica: a RewardRunner (worker processes with per-call timeouts, failure counters)."""

    def __init__(self, *, scorer: ScorerConfig, max_resp_len: int, max_wire_bytes: int, inline: bool = False):
        self._inline = inline
        self._runner = runner_for(scorer, max_resp_len, inline)
        self._max_wire_bytes = max_wire_bytes
        self._metrics = telemetry.RoleMetrics("scorer", replica=serve.get_replica_context().replica_tag)
        self._metrics.set("up", 1)

    @telemetry.tracked
    async def score(self, rollouts: bytes | np.ndarray) -> np.ndarray:
        """ScoredBatch bytes for one RolloutBatch."""
        batch = wire.decode(rollouts, max_bytes=self._max_wire_bytes, expect=wire.RolloutBatch)
        if self._inline:  # microseconds of string comparison: a thread hop would cost more
            scored = self._runner.score_rollouts(batch.groups)
        else:  # waiting on the workers blocks: keep the replica's event loop free
            scored = await asyncio.to_thread(self._runner.score_rollouts, batch.groups)
        self._metrics.sync({"responses_total": self._runner.num_calls})
        for reason, count in dict(self._runner.failures).items():  # a copy: worker threads add to it
            self._metrics.sync({"failures_total": count}, reason=reason)
        return wire.encode_array(wire.ScoredBatch(groups=scored), max_bytes=self._max_wire_bytes)

    def status(self) -> dict:
        return {"calls": self._runner.num_calls, "failures": dict(self._runner.failures),
                "workers": len(self._runner.worker_pids()), "inline": self._inline, "pid": os.getpid()}
