"""The per-prompt fate record and its audit: one fate per prompt drawn; the audit passes a
consistent checkpoint and names each way a prompt can be lost or trained twice."""

import copy
import json

import pytest

from async_pmd.fates import FAILED, PENDING, FateRecord, audit, decode_codes, ordinal


def uid(d: int) -> str:
    return f"e0-i{d * 7}-d{d}"


def checkpoint(record: FateRecord, pending: list[int], step: int) -> dict:
    """A trainer state as the job writes it (the parts the audit reads)."""
    n = len(record)
    return {"step": step, "driver": {
        "fates": json.loads(json.dumps(record.state_dict())),
        "source": {"epoch": 0, "position": n, "num_prompts": 1000},
        "ledger": {"dispatched": n, "pending": [{"uid": uid(d)} for d in pending]}}}


def logged(steps) -> list[dict]:
    return [{"step": s, "timing/step_s": 0.1} for s in steps]


@pytest.fixture
def run():
    """10 prompts drawn, batches of 3: steps 1 and 2 trained 3 each, one filtered, one failed,
    two pending (in flight at the checkpoint of step 2)."""
    r = FateRecord()
    r.dispatch(6)
    r.dispatch(4)
    for d, s in ((0, 1), (1, 1), (4, 1), (2, 2), (3, 2), (6, 2)):
        r.settle(uid(d), "trained", s)
    r.settle(uid(5), "filtered")
    r.settle(uid(7), "malformed")
    return r


def test_a_consistent_checkpoint_passes(run):
    counts, problems = audit(checkpoint(run, [8, 9], step=2), logged([1, 2]), batch_groups=3)
    assert problems == []
    assert counts == {"prompts": 10, "trained": 6, "filtered": 1, "stale": 0, "failed": 1, "pending": 2, "step": 2}


def test_settling_twice_is_a_violation_and_the_first_fate_stands(run):
    run.settle(uid(0), "trained", 2)  # trained twice
    run.settle(uid(42), "stale")  # never dispatched
    assert run.violations == 2 and "already trained at step 1" in run.first_violations[0]
    assert decode_codes(run.state_dict())[0] == 1
    _, problems = audit(checkpoint(run, [8, 9], step=2), logged([1, 2]), batch_groups=3)
    assert len(problems) >= 2


def test_the_audit_names_each_way_to_lose_or_repeat_a_prompt(run):
    cases = {
        "lost": (checkpoint(run, [8], step=2), logged([1, 2]), "d9 is pending but not in the checkpoint's pending list"),
        "trained twice on resume": (checkpoint(run, [8, 9, 0], step=2), logged([1, 2]), "d0 is in the pending list"),
        "short step": (checkpoint(run, [8, 9], step=3), logged([1, 2, 3]), "step 3 trained 0 prompts, not 3"),
        "step twice in the metrics": (checkpoint(run, [8, 9], step=2), logged([1, 2, 2]), "has step 2 2 times"),
        "step missing": (checkpoint(run, [8, 9], step=2), logged([1]), "misses steps [2]"),
    }
    for name, (state, records, message) in cases.items():
        _, problems = audit(state, records, batch_groups=3)
        assert any(message in p for p in problems), (name, problems)
    drifted = checkpoint(run, [8, 9], step=2)
    drifted["driver"]["source"]["position"] = 11  # the cursor passed a prompt the record never saw
    assert any("the cursor passed 11" in p for p in audit(drifted, logged([1, 2]), 3)[1])


def test_state_round_trip_and_growth():
    r = FateRecord()
    r.dispatch(3000)  # grows past its first allocation
    r.settle(uid(2999), "failed")
    fresh = FateRecord()
    fresh.load_state_dict(copy.deepcopy(r.state_dict()))
    codes = decode_codes(fresh.state_dict())
    assert len(fresh) == 3000 and codes[2999] == FAILED and (codes[:2999] == PENDING).all()
    with pytest.raises(ValueError, match="dispatch ordinal"):
        ordinal("val3-1")
