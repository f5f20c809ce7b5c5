"""`weight_sync.transport: collective` through a learner death: the replica follows the new sender;
through a replica death and a scale-down: learner rank 0 closes the group of each replica gone.

The whole job in this process (as in test_faults.py), weights broadcast from learner rank 0 to the
torch-engine replica over gloo. The learner rank is SIGKILLed after a checkpoint; the job rebuilds
every stateful actor from it, the new rank 0 announces itself as the weights' sender, and the
replica opens a group with it and keeps receiving each step's weights. (Learning with this
transport: tests/services/test_e2e.py; the SGLang engine's side: tests/engines/.)
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
from test_faults import assert_accounting, run_job, wait_for

from async_pmd import names
from async_pmd.checkpoint import latest
from job.loop import Trainer

pytestmark = pytest.mark.slow

STEPS = 16
SAVE_FREQ = 5
KILL_AFTER = 7


def _kill_learner(trainer: Trainer, seen: dict, done: threading.Event) -> None:
    wait_for(lambda: trainer.step >= KILL_AFTER and latest(trainer.run_dir) is not None, done)
    store = ray.get_actor(names.WEIGHT_STORE, namespace=trainer.cfg.ray.namespace)
    seen["sender_before"] = ray.get(store.latest.remote())[2][1]
    seen["generator_before"] = trainer_generator_status()
    os.kill(trainer.services.learners.pids()[0], signal.SIGKILL)
    wait_for(lambda: trainer.last_metrics.get("learner/restarts") == 1, done)
    store = ray.get_actor(names.WEIGHT_STORE, namespace=trainer.cfg.ray.namespace)
    seen["sender_after"] = ray.get(store.latest.remote())[2][1]


def trainer_generator_status() -> dict:
    from job.deploy import generator_handle

    return generator_handle().status.remote().result()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("collective"), tmp_path_factory.mktemp("model") / "tiny", "collective_restart", [
        f"trainer.total_steps={STEPS}", f"trainer.save_freq={SAVE_FREQ}", "metrics.enabled=false",
        "weight_sync.transport=collective"], _kill_learner)


def test_the_replica_receives_from_the_rebuilt_learner(run):
    seen, generator = run.seen, run.accounting["generator"]
    assert [r["step"] for r in run.records] == list(range(1, STEPS + 1))
    assert run.accounting["learner/restarts"] == 1
    assert seen["sender_before"] != seen["sender_after"]  # a new rank 0 announced the weights
    assert generator["weight_transport"] == "collective"
    # The replica serving at the end joined the new sender's group and is on the last weights.
    assert generator["policy_version"] >= STEPS - 2, generator
    if generator["pid"] == seen["generator_before"]["pid"]:  # the same replica lived through it
        assert generator["weight_groups_joined"] == seen["generator_before"]["weight_groups_joined"] + 1, generator
    else:
        assert generator["weight_groups_joined"] >= 1, generator
    for record in run.records:
        assert_accounting(record)


# ---------------------------------------------------------------- replicas killed and scaled down

REPLICA_STEPS = 400
REPLICA_KILL_AFTER = 4
PUBLISH_EVERY = 40
CLOSE_WAIT_S = 60.0


def _groups_until(rank0, count: int, done: threading.Event) -> list[str]:
    """Rank 0's weight groups, read until there are `count` (or CLOSE_WAIT_S, or the run ends)."""
    deadline = time.monotonic() + CLOSE_WAIT_S
    while True:
        groups = ray.get(rank0.weight_groups.remote())
        if len(groups) == count or time.monotonic() > deadline or done.is_set():
            return groups
        time.sleep(0.2)


def _kill_then_scale_down(trainer: Trainer, seen: dict, done: threading.Event) -> None:
    """Two replicas, each in a group with rank 0. SIGKILL one: Serve starts another, which opens
    a group, and rank 0 closes the dead one's. Then scale to one replica: Serve stops one
    (`Generator.__del__`) and rank 0 closes its group."""
    from job import scaling

    wait_for(lambda: trainer.step >= REPLICA_KILL_AFTER, done)
    rank0 = trainer.services.learners.ranks[0]
    seen["groups_before"] = _groups_until(rank0, 2, done)
    # Killed between two broadcasts (weights every PUBLISH_EVERY steps; it holds the newest and the
    # next is half an interval away or more): no broadcast to it fails, so only the liveness check
    # on the next open can find it dead.
    namespace = trainer.cfg.ray.namespace

    checked = {}

    def between_broadcasts() -> bool:
        checked["victim"] = victim = scaling.replicas("generators")[0]
        published = scaling.published_version(namespace)
        return (published >= PUBLISH_EVERY and (victim.get("status") or {}).get("policy_version") == published
                and trainer.step % PUBLISH_EVERY < PUBLISH_EVERY // 2)

    wait_for(between_broadcasts, done)
    victim = checked["victim"]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: victim["pid"] not in [r["pid"] for r in scaling.replicas("generators", with_status=False)
                                           if r["state"] == "RUNNING"]
             and len(scaling.replicas("generators", with_status=False)) == 2, done)
    wait_for(lambda: len(set(ray.get(rank0.weight_groups.remote())) - set(seen["groups_before"])) >= 1, done)
    seen["groups_after_kill"] = _groups_until(rank0, 2, done)
    seen["scaled"] = scaling.scale("generators", 1)
    seen["groups_after_scale_down"] = _groups_until(rank0, 1, done)
    seen["step_at_check"] = trainer.step


@pytest.fixture(scope="module")
def replica_run(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("collective_replicas"), tmp_path_factory.mktemp("model") / "tiny",
                   "collective_replica_kill", [
                       f"trainer.total_steps={REPLICA_STEPS}", "trainer.save_freq=0", "metrics.enabled=false",
                       "generator.num_replicas=2", "weight_sync.transport=collective",
                       f"weight_sync.interval={PUBLISH_EVERY}", f"buffer.max_staleness={PUBLISH_EVERY}"], _kill_then_scale_down)


def test_rank0_closes_the_groups_of_replicas_that_died_or_stopped(replica_run):
    seen = replica_run.seen
    assert [r["step"] for r in replica_run.records] == list(range(1, REPLICA_STEPS + 1))
    assert len(seen["groups_before"]) == 2, seen  # one group per replica
    # Before, rank 0 kept every group it ever opened (a communicator and a port each): 3 after the
    # kill (checked without the liveness check), 2 after the scale-down (without `__del__`).
    after_kill = seen["groups_after_kill"]
    assert len(after_kill) == 2 and len(set(after_kill) & set(seen["groups_before"])) == 1, seen
    assert len(seen["scaled"]["after"]) == 1
    after = seen["groups_after_scale_down"]
    assert len(after) == 1 and set(after) <= set(after_kill), seen
    assert seen["step_at_check"] < REPLICA_STEPS, "the run ended before rank 0's groups were read"
    for record in replica_run.records:
        assert_accounting(record)
