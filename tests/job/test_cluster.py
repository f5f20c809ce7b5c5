"""The job's cluster checks, without Ray: what a config reserves, whether it fits the nodes (and
the message when not), and the retried start of a private Ray."""

import pytest

from async_pmd.config import build_config
from job.cluster import Ask, asks, shortfall, with_retries


def test_asks_list_every_reserving_actor():
    """A user reward has scorer replicas; a pure-string built-in is scored by the generators, and
    no scorer is deployed or reserved."""
    common = ["generator.num_replicas=2", "learner.num_ranks=2", "learner.num_cpus_per_rank=0.5", "ray.address=auto"]
    cfg = build_config({}, [*common, "scorer.reward_fn=tests/data/faulty_reward.py:reward"])
    assert [(a.actor, a.cpus) for a in asks(cfg)] == [
        ("Generator replica 0", 1.0), ("Generator replica 1", 1.0), ("RewardScorer replica 0", 0.1),
        ("LearnerRank 0", 0.5), ("LearnerRank 1", 0.5)]
    cfg = build_config({}, common)
    assert cfg.score_in_generator
    assert [a.actor for a in asks(cfg)] == ["Generator replica 0", "Generator replica 1", "LearnerRank 0", "LearnerRank 1"]


def test_shortfall_places_whole_reservations_on_nodes():
    """Two 1-CPU nodes hold 1 + 0.1 + 0.5 + 0.3 (first fit, largest first) but not two 1-CPU
    actors plus a third: each reservation must fit on one node, whatever the total."""
    assert shortfall([Ask("a", 1.0), Ask("b", 0.1), Ask("c", 0.5), Ask("d", 0.3)], [{"CPU": 1.0}, {"CPU": 1.0}]) is None
    why = shortfall([Ask("gen", 1.0), Ask("learner", 1.0), Ask("scorer", 0.1)], [{"CPU": 1.0}, {"CPU": 1.0}])
    assert "1 of 3 reservations do not fit" in why and "first: scorer" in why
    assert "gen: 1 CPU; learner: 1 CPU; scorer: 0.1 CPU" in why and "node 0: 1 CPU, 0 GPU; node 1: 1 CPU" in why
    assert "GPU" in shortfall([Ask("rank", 1.0, gpus=1.0)], [{"CPU": 8.0}])


def test_a_failed_start_is_retried_then_raised():
    calls, cleanups = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("The current node timed out during startup")

    with_retries(flaky, (0.0, 0.0, 0.0), cleanup=lambda: cleanups.append(1))
    assert len(calls) == 3 and len(cleanups) == 2
    with pytest.raises(RuntimeError, match="always"):
        with_retries(lambda: (_ for _ in ()).throw(RuntimeError("always")), (0.0,), cleanup=lambda: None)
