"""WeightStore: the newest published policy version, and where its weights are.

With `weight_sync.transport: object_store` the learner's rank 0 puts a `NamedTensors` message
(its parts: `wire.encode_parts`) into the object store every `weight_sync.interval` steps and the
store keeps (version, that object's ref). Rank 0 owns the object: the put is the weights' one copy
on the way out, and a second copy only so that the store would own it would double the object
store's share of the model (15 GB more at 7B in bf16). So the weights die with a rank 0 that dies:
a replica that has not fetched them yet keeps its own until the job, rebuilt from its checkpoint,
publishes again (`services.generator`). With `collective` rank 0 keeps the weights itself and
announces (version, its own handle): a replica then receives them by broadcast from that rank. Either way generator replicas
ask for the version before each batch and fetch weights only when it moved (weights flow by pull,
so a replica added by scaling starts on the newest weights).
"""

from __future__ import annotations

import logging
import time

import ray

from async_pmd import telemetry

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_restarts=-1)
class WeightStore:
    """Owns the latest (version, ref). Invariant: the version never goes backwards."""

    def __init__(self):
        self._version = -1
        self._ref: ray.ObjectRef | None = None
        self._sender: tuple[ray.actor.ActorHandle, str] | None = None  # (learner rank 0, its actor id)
        self._published = 0
        self._last_publish_s = 0.0
        self._metrics = telemetry.RoleMetrics("weights")

    def publish(self, version: int, refs: list[ray.ObjectRef]) -> float:
        """Keep `refs[0]` (the object ref of a NamedTensors message in parts, in a list so that
        Ray hands it over unresolved) as `version`; an old version is ignored.

        Returns the seconds spent storing it. Idempotent per version, so a retried publish is
        harmless.
        """
        start = time.perf_counter()
        if not (isinstance(refs, list) and len(refs) == 1 and isinstance(refs[0], ray.ObjectRef)):
            raise TypeError(f"publish takes [object ref], got {type(refs).__name__}")
        if version <= self._version:
            logger.info("ignoring publish of version %d (have %d)", version, self._version)
            return 0.0
        self._ref, self._sender = refs[0], None
        self._moved_to(version)
        self._last_publish_s = time.perf_counter() - start
        return self._last_publish_s

    def announce(self, version: int, sender: ray.actor.ActorHandle, sender_id: str) -> None:
        """`collective`: `version` is ready to be broadcast by `sender` (learner rank 0, whose
        actor id is `sender_id`: a rebuilt learner is a new sender, and replicas join it anew)."""
        if version <= self._version:
            logger.info("ignoring announce of version %d (have %d)", version, self._version)
            return
        self._ref, self._sender = None, (sender, sender_id)
        self._moved_to(version)

    def _moved_to(self, version: int) -> None:
        self._version = version
        self._published += 1
        self._metrics.set("version", version)

    def version(self) -> int:
        """The newest version, -1 before the first publish."""
        return self._version

    def latest(self) -> tuple[int, list[ray.ObjectRef], tuple[ray.actor.ActorHandle, str] | None]:
        """(version, [ref], None) after a publish, (version, [], (sender, sender_id)) after an
        announce, (-1, [], None) before either; the ref travels in a list so Ray hands it over
        unresolved."""
        return self._version, [self._ref] if self._ref is not None else [], self._sender

    def status(self) -> dict:
        return {"version": self._version, "published": self._published,
                "last_publish_s": self._last_publish_s}
