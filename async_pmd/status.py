"""The status messages of the stateful actors: what the GroupBuffer and the RolloutDriver report.

`BufferStatus` travels buffer → driver (with every poll) and `DriverStatus` driver → job (each
step's record, the final accounting). Plain dataclasses, so a field read is checked where it is
written, not discovered missing at the end of a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BufferStatus:
    """The GroupBuffer's counters: groups by outcome since the run began (checkpointed), `held` now."""

    trained: int = 0
    filtered: int = 0
    """Out of the band (lb, ub), in drop mode."""
    stale: int = 0
    failed: int = 0
    """A failed reward under `buffer.on_reward_failure=drop_group`, or a NaN on an ok response."""
    duplicate: int = 0
    """A group that arrived twice (a re-issued request that completed too): dropped, not counted again."""
    malformed: int = 0
    """A group with the wrong number of responses."""
    held: int = 0
    refused: int = 0
    """ScoredBatch messages refused as malformed wire bytes."""
    put_waits: int = 0
    """Puts that waited for room (backpressure)."""
    steps_taken: int = 0
    """Learner steps the buffer has handed a batch to."""
    reward_failures: dict[str, int] = field(default_factory=dict)
    """Failed reward calls by reason ("timeout", "exception:ValueError", ...), over every scorer replica."""


@dataclass(frozen=True)
class DriverStatus:
    """The RolloutDriver's side of the accounting, with the buffer's status read in the same call."""

    dispatched: int
    failed: int
    """Groups whose request failed for good (attempts spent, or a deterministic error)."""
    reissued: int
    unfinished: int
    """Dispatched groups not settled yet: in flight, buffered, or pending after a resume."""
    inflight_requests: int
    requests: int
    retries: int
    backpressure_waits: int
    deterministic_failures: int
    max_attempt: int
    """The highest attempt that completed: 2 after a replica death means "re-issued once"."""
    failures: dict[str, int]
    """Failed request attempts by exception type (e.g. RayActorError, TimeoutError)."""
    buffer: BufferStatus
    partial: dict[str, int] = field(default_factory=dict)
    """Partial rollouts' counters (restarts, segments, open groups, ...); empty when they are off."""
