"""GroupBuffer: scored groups in, train batches out.

Takes `ScoredBatch` bytes from the RolloutDriver's chains (scorer → buffer), holds complete groups,
and hands the learner loop `TrainBatch` bytes of `data.train_batch_size` groups, with advantages
(the configured estimator) and partition weights (band filter, optional IS) computed vectorised
over the batch. Groups older than `buffer.max_staleness` learner steps are dropped and counted.
Bounded: a `put` that would overflow `buffer.capacity_groups` waits for a `take` (backpressure on
the driver) instead of growing. All the logic is `async_pmd.grouping.GroupStore`; this shell adds
the waiting and the wire.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import numpy as np
import ray

from async_pmd import telemetry, wire
from async_pmd.config import AlgorithmConfig, BufferConfig
from async_pmd.status import BufferStatus

# `async_pmd.grouping` (torch) is imported in the methods that use it, not here: every process
# that takes a handle to this actor loads this module (the driver's, the launcher's), and torch
# is seconds of CPU at start-up that only this actor's own process needs.

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class GroupBuffer:
    """Owns the GroupStore. One event loop, so store calls never interleave mid-update."""

    def __init__(self, *, algorithm: AlgorithmConfig, buffer: BufferConfig, group_size: int,
                 pad_token_id: int, max_wire_bytes: int):
        from async_pmd.grouping import GroupStore

        self._store = GroupStore(
            group_size=group_size, algorithm=algorithm, max_staleness=buffer.max_staleness,
            capacity_groups=buffer.capacity_groups, on_failure=buffer.on_reward_failure,
            pad_token_id=pad_token_id,
        )
        self._max_wire_bytes = max_wire_bytes
        # Notified whenever groups arrive or leave: wakes a waiting take, a waiting put, and (on a
        # take that dropped stale groups) the driver's `watch`, its wake-up instead of polling.
        self._changed = asyncio.Condition()
        # Settled groups the driver has not acknowledged yet; entry i has sequence number
        # `_settled_from + i` (the driver acknowledges by count, see `report`).
        self._settled: list[tuple[str, str, int]] = []
        self._settled_from = 0
        self._steps_taken = 0
        self._refused = 0  # ScoredBatch messages refused as malformed wire bytes
        self._put_waits = 0  # puts that had to wait for room (backpressure events)
        # Failed reward calls by reason ("timeout", "exception:ValueError", ...) in the batches put
        # here: one count over every scorer replica, checkpointed with the rest of the accounting.
        self._reward_failures: Counter[str] = Counter()
        self._metrics = telemetry.RoleMetrics("buffer")

    async def put(self, scored: np.ndarray | bytes, acked: int | None = None) -> dict:
        """Commit a ScoredBatch; returns this call's counts. Malformed bytes: {"refused": 1}.
        With `acked` (the driver's), the counts carry its `report` too ("report": the first three
        items): so the driver's own puts need no watch to be seen."""
        try:
            batch = wire.decode(scored, max_bytes=self._max_wire_bytes, expect=wire.ScoredBatch)
        except wire.WireError as exc:
            self._refused += 1
            logger.warning("refused a scored batch: %s", exc)
            counts = {"refused": 1, "error": str(exc)}
        else:
            from async_pmd.grouping import BufferFull

            async with self._changed:
                while True:
                    try:
                        counts = self._store.put(batch)
                        break
                    except BufferFull:
                        self._put_waits += 1
                        await self._changed.wait()
                self._changed.notify_all()  # a take waiting for groups
            self._reward_failures.update(s.removeprefix("failed:") for g in batch.groups
                                         for s in g.reward_status if s != "ok")
        if acked is not None:
            counts["report"] = self.report(acked)[:3]
        return counts

    async def take(self, num_groups: int, learner_step: int, timeout_s: float) -> tuple[np.ndarray | None, dict]:
        """TrainBatch bytes of `num_groups` groups for `learner_step`, or (None, {}) on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        async with self._changed:
            while True:
                stale = self._store.counters["stale"]
                batch, metrics = self._store.take(num_groups, learner_step)
                if batch is not None:
                    break
                if self._store.counters["stale"] > stale:
                    self._changed.notify_all()  # the driver's watch: groups it has not seen leave
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return None, {}
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    pass
            self._steps_taken = learner_step + 1
            self._changed.notify_all()
        for staleness in learner_step - batch.policy_versions[::self._store.group_size]:  # one per group
            self._metrics.observe("staleness_steps", staleness)
        return wire.encode_array(batch, max_bytes=self._max_wire_bytes), metrics

    async def watch(self, stale: int, acked: int) -> tuple[int, list[tuple[str, str, int]], BufferStatus]:
        """The driver's view (`report`) once a take has dropped stale groups past the count `stale`:
        the one change no call of the driver's brings back (its puts' replies carry their own
        report, and the learner loop's status call after each step the batch taken and trained).
        So in a healthy run this call stays pending; the driver awaits it with its requests
        instead of polling the buffer, and it wakes the driver when a take that found too few
        fresh groups has freed room and needs more."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._store.counters["stale"] > stale)
        return self.report(acked)[:3]

    def report(self, acked: int, with_state: bool = False, trained_steps: int | None = None
               ) -> tuple[int, list[tuple[str, str, int]], BufferStatus, dict | None]:
        """The driver's view, read atomically: (sequence number of the first entry, the (uid,
        outcome, step) settled after the first `acked` ones, the status, and for a checkpoint the
        state), so the driver's pending list and these counters agree. Idempotent: entries stay
        until a later call acknowledges them, so a reply the driver drops (a cancelled watch)
        loses nothing. `trained_steps`, from the learner loop, confirms the last batch as trained."""
        if trained_steps is not None:
            self._store.confirm(trained_steps)
        self._settled += self._store.drain_resolved()
        done = min(max(acked - self._settled_from, 0), len(self._settled))
        del self._settled[:done]
        self._settled_from += done
        self._export_metrics()
        return (self._settled_from, list(self._settled), self.status(),
                self.state_dict() if with_state else None)

    # ------------------------------------------------------------------ lifecycle

    def status(self) -> BufferStatus:
        return BufferStatus(**self._store.counters, refused=self._refused, put_waits=self._put_waits,
                            steps_taken=self._steps_taken, reward_failures=dict(self._reward_failures))

    def state_dict(self) -> dict:
        return {"store": self._store.state_dict(), "steps_taken": self._steps_taken,
                "refused": self._refused, "reward_failures": dict(self._reward_failures)}

    def load_state_dict(self, state: dict) -> None:
        self._store.load_state_dict(state["store"])
        self._steps_taken = int(state["steps_taken"])
        self._refused = int(state.get("refused", 0))
        self._reward_failures = Counter({str(k): int(v) for k, v in state.get("reward_failures", {}).items()})

    # ------------------------------------------------------------------ helpers

    def _export_metrics(self) -> None:
        if not self._metrics.due():  # the driver's reports come many times a second
            return
        counters = self._store.counters
        self._metrics.set("groups_held", counters.pop("held"))
        for outcome, total in counters.items():
            self._metrics.sync({"groups_total": total}, outcome=outcome)
        self._metrics.sync({"put_waits_total": self._put_waits})
