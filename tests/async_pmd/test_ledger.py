"""The driver's ledger and admission rule: nothing dispatched twice, nothing lost, staleness bounded."""

import pytest

from async_pmd.data import Prompt
from async_pmd.ledger import Ledger, may_dispatch


def prompts(*indices):
    return [Prompt(i, f"{i}+0=", str(i), {"task": "add_mod10"}) for i in indices]


def test_reissue_does_not_dispatch_again_and_fail_is_counted_once():
    """A re-issued request keeps dispatched unchanged; failing it twice counts once."""
    ledger = Ledger()
    req = ledger.open(prompts(1, 2, 3), ["a", "b", "c"])
    assert ledger.dispatched == 3 and set(ledger.unresolved) == {"a", "b", "c"}
    ledger.resolve(["b"])  # the buffer settled b (e.g. a late first completion)
    again = ledger.reissue(req)
    assert again.uids == ["a", "c"] and again.attempt == 2 and again.request_id == req.request_id
    assert ledger.dispatched == 3 and ledger.reissued == 1
    assert len(ledger.fail(again.uids)) == 2 and ledger.fail(again.uids) == []
    assert ledger.failed == 2 and not ledger.unresolved
    assert ledger.reissue(again) is None  # nothing left to re-issue


def test_accounting_identity_across_state_dict():
    """dispatched == settled + unresolved; the pending prompts survive a checkpoint exactly."""
    ledger = Ledger()
    ledger.open(prompts(1, 2), ["a", "b"])
    ledger.open(prompts(3), ["c"])
    ledger.resolve(["a"])
    state = ledger.state_dict()
    restored = Ledger()
    pending = restored.load_state_dict(state)
    assert [uid for uid, _ in pending] == ["b", "c"]
    assert pending[0][1] == Prompt(2, "2+0=", "2", {"task": "add_mod10"})
    restored.open([p for _, p in pending], [u for u, _ in pending], already_dispatched=True)
    assert restored.dispatched == 3 and len(restored.unresolved) == 2


def test_malformed_state_is_refused():
    with pytest.raises(ValueError, match="ledger state"):
        Ledger().load_state_dict({"dispatched": 1})


@pytest.mark.parametrize(
    "steps_taken, outstanding, version, max_staleness, expected",
    [
        # sync: after taking batch 0 (steps_taken=1) with version 0 still published, wait...
        (1, 0, 0, 0, False),
        # ...until version 1 is published; then one batch (4 groups) may go out, not more.
        (1, 0, 1, 0, True),
        (1, 3, 1, 0, True),   # groups 0..3 -> trained at step 1 + 3 // 4 = 1, staleness 0
        (1, 4, 1, 0, False),  # a fifth group would be trained at step 2 with version 1
        # one step of overlap: a batch ahead is admitted with the old weights
        (1, 0, 0, 1, True),
        (1, 4, 0, 1, False),
    ],
)
def test_may_dispatch_bounds_staleness(steps_taken, outstanding, version, max_staleness, expected):
    """A group admitted now is trained at step steps_taken + outstanding // batch with weights >= version."""
    assert may_dispatch(steps_taken=steps_taken, outstanding=outstanding, new=1, published_version=version,
                        batch_groups=4, max_staleness=max_staleness, capacity_groups=100) is expected


def test_may_dispatch_respects_capacity():
    assert not may_dispatch(steps_taken=0, outstanding=9, new=2, published_version=0, batch_groups=4,
                            max_staleness=10, capacity_groups=10)


def test_may_dispatch_never_starves_a_waiting_learner():
    """Sync mode, a batch of 32 from requests of 16: one group failed, so 31 are out and the
    learner waits for the 32nd. The next request's last groups would be trained a step later,
    yet refusing it would wait for ever: the first group decides while less than a batch is out
    (the overshoot goes stale in the buffer, counted). With new weights not yet published it
    still waits, as sync must."""
    kwargs = dict(new=16, batch_groups=32, max_staleness=0, capacity_groups=256)
    assert may_dispatch(steps_taken=5, outstanding=31, published_version=5, **kwargs)
    assert not may_dispatch(steps_taken=5, outstanding=32, published_version=5, **kwargs)
    assert not may_dispatch(steps_taken=6, outstanding=0, published_version=5, **kwargs)
