"""GroupStore: the GroupBuffer's pure logic (no Ray).

Contract pinned here: each uid is classified once (held, then trained or stale; or filtered /
failed / malformed / duplicate), `put` is all-or-nothing against the capacity, `take` is FIFO over
fresh groups, and the TrainBatch it builds is padded as the learner expects and carries exactly the
advantages and weights the algos functions give for the same rewards. The reward band is applied
once: at `put` under band_filter="drop", as weight 0 at `take` under "weight" (the seed's).
"""

import json
import math

import numpy as np
import pytest
import torch

from async_pmd import wire
from async_pmd.algos import compute_wpmd_weight, get_adv_estimator_fn
from async_pmd.config import AlgorithmConfig
from async_pmd.grouping import BufferFull, GroupStore
from async_pmd.wire import ScoredBatch, ScoredGroup

PAD = 0
N = 4


def group(uid, rewards=(1.0, 0.0, 0.0, 0.0), *, version=0, prompt_len=3, lengths=None, status=None,
          finish=None):
    """A ScoredGroup of len(rewards) responses; response j has lengths[j] tokens (default j + 1)."""
    n = len(rewards)
    lengths = [j + 1 for j in range(n)] if lengths is None else lengths
    return ScoredGroup(
        uid=uid, prompt_ids=np.arange(1, prompt_len + 1, dtype=np.int32),
        response_ids=[np.arange(10, 10 + L, dtype=np.int32) for L in lengths],
        logprobs=[np.full(L, -0.5, np.float32) for L in lengths],
        finish_reasons=finish or ["stop"] * n, policy_version=version, prompt_text="p",
        response_texts=["r"] * n, answer="a", sample_index=0,
        rewards=np.array(rewards, np.float32), reward_status=status or ["ok"] * n)


def batch(*groups):
    return ScoredBatch(groups=list(groups))


def store(*, capacity=8, max_staleness=1, on_failure="zero", **algo):
    algorithm = AlgorithmConfig(**{"adv_estimator": "ploo", **algo})
    return GroupStore(group_size=N, algorithm=algorithm, max_staleness=max_staleness,
                      capacity_groups=capacity, on_failure=on_failure, pad_token_id=PAD)


def taken_uids(tb):
    return list(dict.fromkeys(tb.uids))


# ----------------------------------------------------------------------------- grouping and FIFO


def test_groups_from_several_puts_are_taken_oldest_first():
    """Groups arrive in any order over several puts; take pops the oldest, rows in uid order (so a
    batch does not depend on which request arrived first); they count as trained once their
    learner step is confirmed done."""
    s = store()
    assert s.put(batch(group("c"), group("a"))) == {"held": 2, "duplicate": 0, "malformed": 0,
                                                     "failed": 0, "filtered": 0}
    s.put(batch(group("b")))
    assert s.held_uids() == ["c", "a", "b"]
    tb, _ = s.take(2, learner_step=0)
    assert taken_uids(tb) == ["a", "c"] and tb.uids == ["a"] * N + ["c"] * N
    assert s.take(2, learner_step=0) == (None, {})  # one left: not enough
    tb, metrics = s.take(1, learner_step=0)
    assert taken_uids(tb) == ["b"] and metrics["groups/held_after"] == 0
    assert s.counters["trained"] == 0 and s.counters["held"] == 3  # step 0 not known done yet
    assert s.drain_resolved() == []
    s.confirm(1)
    assert s.counters == {"trained": 3, "filtered": 0, "stale": 0, "failed": 0, "duplicate": 0,
                          "malformed": 0, "held": 0}
    assert sorted(s.drain_resolved()) == [("a", "trained", 1), ("b", "trained", 1), ("c", "trained", 1)]
    assert s.drain_resolved() == []


def test_a_batch_not_confirmed_trained_is_pending_in_the_state():
    """A stop between take and train: the taken groups are neither trained nor seen in the saved
    state, so the driver's pending list re-issues them after a resume, accepted, not duplicates."""
    s = store()
    s.put(batch(group("a"), group("b")))
    assert s.take(2, learner_step=0)[0] is not None
    s.confirm(0)  # learner step 0 not done: nothing changes
    state = s.state_dict()
    assert state["counters"]["trained"] == 0 and state["seen"] == [] and s.drain_resolved() == []
    fresh = store()
    fresh.load_state_dict(state)
    assert fresh.put(batch(group("a"), group("b")))["held"] == 2
    s.confirm(1)  # learner step 0 done: metrics step 1
    assert s.counters["trained"] == 2 and [r[1:] for r in s.drain_resolved()] == [("trained", 1)] * 2


def test_duplicates_counted_and_never_trained_twice():
    """A uid seen before (held, trained, or earlier in the same batch) is a duplicate."""
    s = store()
    assert s.put(batch(group("a"), group("a")))["duplicate"] == 1  # same batch
    assert s.put(batch(group("a")))["duplicate"] == 1  # while held
    tb, _ = s.take(1, learner_step=0)
    assert tb.batch_size == N
    assert s.put(batch(group("a"), group("b")))["duplicate"] == 1  # after training
    assert s.held_uids() == ["b"]
    s.confirm(1)
    assert s.counters["duplicate"] == 3 and s.counters["trained"] == 1


def test_malformed_group_size_is_refused():
    """A group whose n != group_size is refused, counted, resolved; nothing is held."""
    s = store()
    counts = s.put(batch(group("short", rewards=(1.0, 0.0, 0.0))))
    assert counts["malformed"] == 1 and counts["held"] == 0
    assert s.held_uids() == [] and s.counters["malformed"] == 1
    assert s.drain_resolved() == [("short", "malformed", 0)]


# ----------------------------------------------------------------------------- failures and band


def test_failed_reward_drop_group_vs_zero():
    """drop_group drops a group with any failed reward; zero trains it with reward 0 there."""
    failed = dict(rewards=(1.0, float("nan"), 1.0, 0.0), status=["ok", "failed:timeout", "ok", "ok"])
    s = store(on_failure="drop_group")
    assert s.put(batch(group("x", **failed), group("y")))["failed"] == 1
    assert s.held_uids() == ["y"] and s.drain_resolved() == [("x", "failed", 0)]

    s = store(on_failure="zero")
    assert s.put(batch(group("x", **failed)))["held"] == 1
    tb, _ = s.take(1, learner_step=0)
    np.testing.assert_array_equal(tb.rewards, [1.0, 0.0, 1.0, 0.0])
    assert np.isfinite(tb.advantages).all()


def test_nan_on_an_ok_response_fails_the_group():
    """A NaN reward whose status says ok is the scorer breaking its contract: never trained."""
    s = store()
    assert s.put(batch(group("x", rewards=(float("nan"), 0.0, 0.0, 0.0))))["failed"] == 1


@pytest.mark.parametrize("lb, ub, held", [
    (0.0, 1.0, ["mixed"]),      # all-0 (mean 0) and all-1 (mean 1) sit on the edges: dropped
    (0.25, None, ["ones"]),     # mean 0.25 == lb is dropped; mean 1 > lb is kept
    (0.2499, 0.2501, ["mixed"]),
    (None, 0.25, ["zeros"]),
    (None, None, ["zeros", "mixed", "ones"]),
])
def test_band_filter_is_open_interval(lb, ub, held):
    """band_filter="drop": keep a group only if its mean reward is in (lb, ub); the edges are dropped."""
    s = store(partition_reward_lb=lb, partition_reward_ub=ub, band_filter="drop")
    counts = s.put(batch(group("zeros", rewards=(0.0,) * N), group("mixed", rewards=(1.0, 0.0, 0.0, 0.0)),
                         group("ones", rewards=(1.0,) * N)))
    assert s.held_uids() == held
    assert counts["filtered"] == 3 - len(held) == s.counters["filtered"]


@pytest.mark.parametrize("lb, ub, weighted", [
    (0.0, 1.0, [False, True, False]),
    (0.25, None, [False, False, True]),
    (None, 0.25, [True, False, False]),
    (None, None, [True, True, True]),
])
def test_band_filter_weight_keeps_groups_at_weight_zero(lb, ub, weighted):
    """band_filter="weight" (default, the seed's): every group is held and trained; an
    out-of-band group's rows get weight 0, the others weight 1 on their response tokens."""
    s = store(partition_reward_lb=lb, partition_reward_ub=ub)
    assert s.algorithm.band_filter == "weight"
    counts = s.put(batch(group("zeros", rewards=(0.0,) * N), group("mixed", rewards=(1.0, 0.0, 0.0, 0.0)),
                         group("ones", rewards=(1.0,) * N)))
    assert counts["filtered"] == 0 and s.held_uids() == ["zeros", "mixed", "ones"]
    tb, metrics = s.take(3, learner_step=0)
    by_uid = dict(zip(["zeros", "mixed", "ones"], weighted))  # rows come in uid order
    want = np.array([by_uid[u] for u in tb.uids], np.float32)[:, None] * tb.response_mask
    np.testing.assert_array_equal(tb.partition_weights, want)
    assert metrics["groups/band_zero_weight"] == 3 - sum(weighted)
    assert metrics["groups/zero_signal"] == pytest.approx(2 / 3)  # "zeros" and "ones": all rewards equal
    s.confirm(1)
    assert s.counters["trained"] == 3 and s.counters["filtered"] == 0


@pytest.mark.parametrize("band_filter", ["weight", "drop"])
def test_band_is_applied_once(band_filter, monkeypatch):
    """The band is evaluated at `put` under "drop" and at `take` under "weight", never both, and
    compute_wpmd_weight is never asked to apply it again."""
    from async_pmd import grouping

    calls = []
    real_mask, real_weight = grouping.group_band_mask, grouping.compute_wpmd_weight
    monkeypatch.setattr(grouping, "group_band_mask", lambda *a, **k: calls.append("band") or real_mask(*a, **k))
    monkeypatch.setattr(grouping, "compute_wpmd_weight",
                        lambda *a, **k: calls.append(f"weights apply_band={k['apply_band']}") or real_weight(*a, **k))
    s = store(partition_reward_lb=0.0, partition_reward_ub=1.0, band_filter=band_filter, use_is=True)
    s.put(batch(group("mixed"), group("zeros", rewards=(0.0,) * N)))
    at_put, calls[:] = list(calls), []
    s.take(len(s.held_uids()), learner_step=0)
    assert (at_put, calls) == ((["band"], ["weights apply_band=False"]) if band_filter == "drop"
                               else ([], ["weights apply_band=False", "band"]))


def test_band_weight_mode_loss_is_kept_share_of_drop_mode_loss():
    """The same groups through both modes: "weight" trains B rows, B_kept of them in band, and its
    opmd loss (a mean over all B rows) is B_kept/B times the "drop" batch's loss."""
    from async_pmd.algos import compute_policy_loss_opmd

    groups = [group("a", rewards=(1.0, 0.0, 0.0, 1.0)), group("all0", rewards=(0.0,) * N),
              group("b", rewards=(0.0, 1.0, 0.0, 0.0)), group("all1", rewards=(1.0,) * N)]
    losses = {}
    for mode in ("weight", "drop"):
        s = store(partition_reward_lb=0.0, partition_reward_ub=1.0, band_filter=mode, partition_tau=0.5)
        s.put(batch(*groups))
        tb, _ = s.take(len(s.held_uids()), learner_step=0)
        t = {k: torch.from_numpy(np.array(getattr(tb, k), np.float64))
             for k in ("old_log_probs", "advantages", "response_mask", "partition_weights")}
        new = t["old_log_probs"] + 0.1 * t["response_mask"]  # a policy that moved
        loss, _ = compute_policy_loss_opmd(t["old_log_probs"], new, t["advantages"], t["response_mask"],
                                           partition_weights=t["partition_weights"])
        losses[mode] = (loss.item(), tb.batch_size)
    (weighted, rows), (dropped, kept_rows) = losses["weight"], losses["drop"]
    assert (rows, kept_rows) == (4 * N, 2 * N) and dropped > 0
    assert weighted == pytest.approx(kept_rows / rows * dropped, rel=1e-12)


# ----------------------------------------------------------------------------- staleness


@pytest.mark.parametrize("max_staleness, kept_versions", [(0, [3]), (1, [2, 3])])
def test_stale_groups_dropped_at_take(max_staleness, kept_versions):
    """At learner_step 3, a group of version v is stale iff 3 - v > max_staleness."""
    s = store(max_staleness=max_staleness)
    s.put(batch(*[group(f"v{v}", version=v) for v in range(4)]))
    assert s.take(3, learner_step=3) == (None, {})  # stale drop happens even when no batch comes out
    assert s.counters["stale"] == 4 - len(kept_versions)
    assert s.held_uids() == [f"v{v}" for v in kept_versions]
    tb, metrics = s.take(len(kept_versions), learner_step=3)
    np.testing.assert_array_equal(np.unique(tb.policy_versions), kept_versions)
    assert metrics["staleness/max"] == 3 - kept_versions[0]


# ----------------------------------------------------------------------------- the TrainBatch


@pytest.mark.parametrize("estimator", ["ploo", "rloo", "partition", "grpo"])
@pytest.mark.parametrize("use_is", [False, True])
def test_advantages_and_weights_match_the_algos(estimator, use_is):
    """The batch's advantages / weights are the algos functions called on the same token rewards."""
    s = store(adv_estimator=estimator, partition_tau=0.5, use_is=use_is, partition_reward_lb=0.0)
    s.put(batch(group("a", rewards=(1.0, 0.0, 0.5, 0.0)), group("b", rewards=(0.2, 0.9, 0.0, 0.3))))
    tb, _ = s.take(2, learner_step=0)
    lengths = tb.response_mask.sum(1).astype(int)
    tlr = np.zeros(tb.responses.shape, np.float32)
    tlr[np.arange(tb.batch_size), lengths - 1] = tb.rewards
    tlr, mask = torch.from_numpy(tlr), torch.from_numpy(np.array(tb.response_mask))
    index = np.array(tb.uids)
    want_adv, _ = get_adv_estimator_fn(estimator)(tlr, mask, index, s.algorithm)
    want_w = compute_wpmd_weight(tlr, mask, index, s.algorithm, use_is=use_is)
    np.testing.assert_array_equal(tb.advantages, want_adv.numpy())
    np.testing.assert_array_equal(tb.partition_weights, want_w.numpy())


def test_ploo_by_hand():
    """rewards [1,0,0,0], τ = 1, b_i = log mean_{j≠i} exp(r_j):
    row 0: others all 0 -> mean e^0 = 1 -> b = 0 -> A = 1;
    rows 1..3: others {1,0,0} -> mean (e + 2)/3 = 1.5727606 -> b = 0.4528324 -> A = -0.4528324.
    Weights: no band, no IS -> 1 on every response token."""
    s = store(partition_tau=1.0)
    s.put(batch(group("g", rewards=(1.0, 0.0, 0.0, 0.0), lengths=[2, 2, 2, 2])))
    tb, metrics = s.take(1, learner_step=0)
    np.testing.assert_allclose(tb.advantages[:, 0], [1.0, -0.4528324, -0.4528324, -0.4528324], atol=1e-6)
    np.testing.assert_allclose(tb.advantages[:, 1], tb.advantages[:, 0])
    np.testing.assert_array_equal(tb.partition_weights, np.ones((4, 2), np.float32))
    assert metrics["adv/mean"] == pytest.approx((1 - 3 * 0.4528324) / 4, abs=1e-6)
    assert metrics["reward/mean"] == 0.25 and metrics["reward/max"] == 1 and metrics["reward/min"] == 0


def test_padding_layout():
    """Prompts left-padded, responses right-padded, masks mark the real tokens, rewards on the
    last token; a zero-length response gets an all-zero mask, zero reward and no NaN."""
    s = store(adv_estimator="rloo")
    s.put(batch(group("a", prompt_len=2, lengths=[1, 3, 0, 2], rewards=(1.0, 1.0, 1.0, 0.0),
                      finish=["stop", "length", "stop", "stop"]),
                group("b", prompt_len=3, lengths=[1, 1, 1, 1])))
    tb, metrics = s.take(2, learner_step=0)
    assert tb.prompts.shape == (8, 3) and tb.responses.shape == (8, 3)
    np.testing.assert_array_equal(tb.prompts[0], [PAD, 1, 2])
    np.testing.assert_array_equal(tb.prompts[4], [1, 2, 3])
    np.testing.assert_array_equal(tb.responses[:4], [[10, PAD, PAD], [10, 11, 12], [PAD] * 3, [10, 11, PAD]])
    np.testing.assert_array_equal(tb.response_mask[:4], [[1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(tb.attention_mask[0], [0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(tb.attention_mask[2], [0, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(tb.old_log_probs[1], [-0.5, -0.5, -0.5])
    np.testing.assert_array_equal(tb.old_log_probs[2], [0, 0, 0])
    # The zero-length response's reward 1 is dropped (no token to credit): rloo sees [1,1,0,0].
    np.testing.assert_array_equal(tb.rewards[:4], [1, 1, 0, 0])
    np.testing.assert_allclose(tb.advantages[0, 0], 1 - 1 / 3)  # r - mean of the others
    assert np.isfinite(tb.advantages).all() and (tb.advantages[2] == 0).all()
    assert metrics["response_length/clip_ratio"] == 1 / 8
    assert metrics["response_length/mean"] == (1 + 3 + 0 + 2 + 4) / 8


def test_train_batch_wire_round_trip():
    """The built TrainBatch satisfies the wire schema and survives encode/decode unchanged."""
    s = store()
    s.put(batch(group("a", version=2), group("b", version=3, lengths=[0, 4, 1, 2])))
    tb, _ = s.take(2, learner_step=3)
    back = wire.decode(wire.encode(tb), expect=wire.TrainBatch)
    for name in ("prompts", "responses", "response_mask", "attention_mask", "old_log_probs",
                 "advantages", "partition_weights", "rewards", "policy_versions"):
        a, b = getattr(tb, name), getattr(back, name)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert back.uids == tb.uids and back.learner_step == 3


# ----------------------------------------------------------------------------- capacity, accounting


def test_buffer_full_changes_nothing():
    """put raises BufferFull before any change when the groups to hold exceed room()."""
    s = store(capacity=2)
    s.put(batch(group("a")))
    before = (s.counters, s.held_uids(), s.state_dict())
    full = batch(group("b"), group("c"), group("a"), group("f", rewards=(float("nan"),) * N))
    assert s.room() == 1
    with pytest.raises(BufferFull):
        s.put(full)
    assert (s.counters, s.held_uids(), s.state_dict()) == before
    s.take(1, learner_step=0)
    assert s.put(full) == {"held": 2, "duplicate": 1, "malformed": 0, "failed": 1, "filtered": 0}
    with pytest.raises(ValueError):
        s.take(3, learner_step=0)  # more than the capacity could ever hold


def test_accounting_identity():
    """Every arrival is exactly one of held / trained / filtered / stale / failed / duplicate /
    malformed, and every distinct uid ends in exactly one place (held, or drained as resolved)."""
    rng = np.random.default_rng(0)
    s = store(capacity=6, max_staleness=1, on_failure="drop_group", partition_reward_lb=0.0,
              partition_reward_ub=1.0, band_filter="drop")
    arrivals, distinct, resolved = 0, set(), []
    for step in range(30):
        groups = []
        for _ in range(rng.integers(0, 4)):
            uid = f"u{rng.integers(0, 40)}"  # reused ids make duplicates
            n = N if rng.random() > 0.1 else N - 1
            rewards = rng.integers(0, 2, n).astype(float)
            status = ["ok"] * n
            if rng.random() < 0.15:
                rewards[0], status[0] = float("nan"), "failed:boom"
            version = max(step - int(rng.integers(0, 3)), 0)
            groups.append(group(uid, tuple(rewards), version=version, status=status))
        try:
            s.put(batch(*groups))
        except BufferFull:
            pass
        else:
            arrivals += len(groups)
            distinct |= {g.uid for g in groups}
        s.take(2, learner_step=step)
        resolved += [uid for uid, _, _ in s.drain_resolved()]
    s.confirm(30)  # the last batch's step is done too
    resolved += [uid for uid, _, _ in s.drain_resolved()]
    c = s.counters
    assert sum(c.values()) == arrivals
    assert c["duplicate"] == arrivals - len(distinct)
    assert len(resolved) == len(set(resolved)) and not set(resolved) & set(s.held_uids())
    assert set(resolved) | set(s.held_uids()) == distinct
    assert all(c[k] > 0 for k in ("trained", "filtered", "stale", "failed", "duplicate", "malformed"))


def test_state_dict_round_trip():
    """Counters and resolved uids survive JSON; held uids are not remembered, so their re-issue
    after a resume is accepted; a bad state is refused with ValueError."""
    s = store(partition_reward_lb=0.0, band_filter="drop")
    s.put(batch(group("t"), group("f", rewards=(0.0,) * N), group("h")))
    s.put(batch(group("t")))
    s.take(1, learner_step=0)
    s.confirm(1)
    state = json.loads(json.dumps(s.state_dict()))
    fresh = store(partition_reward_lb=0.0, band_filter="drop")
    fresh.load_state_dict(state)
    assert fresh.counters == {**s.counters, "held": 0}
    assert sorted(fresh.drain_resolved()) == [("f", "filtered", 0), ("t", "trained", 1)]
    assert fresh.put(batch(group("t"), group("f"), group("h"))) == {
        "held": 1, "duplicate": 2, "malformed": 0, "failed": 0, "filtered": 0}
    for bad in ({}, {**state, "version": 9}, {**state, "counters": {**state["counters"], "trained": -1}},
                {**state, "seen": [1]}, {**state, "pending_resolved": ["nope"]}):
        with pytest.raises(ValueError):
            store().load_state_dict(bad)
    with pytest.raises(ValueError, match="empty store"):
        fresh.load_state_dict(state)


def test_take_metrics_keys():
    s = store()
    s.put(batch(group("a")))
    _, metrics = s.take(1, learner_step=1)
    assert {"reward/mean", "reward/std", "reward/max", "reward/min", "staleness/mean", "staleness/max",
            "response_length/mean", "response_length/clip_ratio", "adv/mean", "adv/abs_mean",
            "partition_weight/mean", "groups/held_after"} <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
