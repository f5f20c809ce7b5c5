"""`weight_sync.transport: collective` through a learner death: the replica follows the new sender.

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
