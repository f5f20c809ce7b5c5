"""GroupBuffer.put at the wire boundary, without Ray (the actor's own class, driven by asyncio).

Contract: bytes that are not a valid ScoredBatch (truncated, wrong format version, wrong kind,
wrong shapes, oversized, non-finite log-probs or rewards, a pickle, a Python object instead of
bytes) are refused with a WireError inside, answered `{"refused": 1}`, counted in `refused`, and
leave the buffer's state exactly as it was. Nothing else ever escapes `put`.
"""

import asyncio
import copy
import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from async_pmd import wire
from async_pmd.config import AlgorithmConfig, BufferConfig
from bad_wire import hostile, scored_batch
from services.buffer import GroupBuffer

N = 8  # group size
MAX_BYTES = 64 * 1024


def make_buffer():
    return GroupBuffer.__ray_actor_class__(
        algorithm=AlgorithmConfig(), buffer=BufferConfig(capacity_groups=64), group_size=N, pad_token_id=0,
        max_wire_bytes=MAX_BYTES)


def snapshot(buffer) -> tuple[dict, dict]:
    """Everything the buffer holds and counts, but the refusal counter itself."""
    status, state = dataclasses.asdict(buffer.status()), buffer.state_dict()
    status.pop("refused"), state.pop("refused")
    return copy.deepcopy(state | {"held": buffer._store.held_uids()}), status


VALID = wire.encode(scored_batch(["g0", "g1"], N))
OVERSIZED = wire.encode(scored_batch(["big"], N, response_len=MAX_BYTES // (8 * N) + 1), max_bytes=2**30)
HOSTILE = hostile(VALID, kind="ScoredBatch", oversized=OVERSIZED)


def test_every_hostile_message_is_refused_counted_and_changes_nothing():
    buffer = make_buffer()
    asyncio.run(buffer.put(wire.encode(scored_batch(["before"], N))))  # some state to keep
    before = snapshot(buffer)
    for i, (name, message) in enumerate(HOSTILE.items(), start=1):
        counts = asyncio.run(buffer.put(message))
        assert counts["refused"] == 1, name
        assert buffer.status().refused == i, name
        assert snapshot(buffer) == before, name
    # And the buffer still takes good bytes afterwards.
    assert asyncio.run(buffer.put(VALID))["held"] == 2


def test_hostile_cases_cover_the_issue():
    assert {"truncated", "wrong_version", "wrong_shape", "oversized", "nan_logprob"} <= HOSTILE.keys()
    assert len(OVERSIZED) > MAX_BYTES


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(-64, 64))
def test_fuzzed_bytes_are_refused_without_change_or_accepted_whole(edits, resize):
    """Random byte edits and truncations/extensions of a valid message: either refused with the
    state unchanged, or (an edit that keeps the schema, e.g. a token id) accepted as two groups."""
    buf = bytearray(VALID)
    for pos, value in edits:
        buf[pos] = value
    buf = buf[:len(buf) + resize] if resize < 0 else buf + bytes(resize)
    buffer = make_buffer()
    before = snapshot(buffer)
    counts = asyncio.run(buffer.put(bytes(buf)))
    if counts.get("refused"):
        assert snapshot(buffer) == before and buffer.status().refused == 1
    else:
        decoded = wire.decode(bytes(buf), expect=wire.ScoredBatch)
        assert sum(v for k, v in counts.items()) == len(decoded.groups)
        assert buffer.status().refused == 0


def test_reward_failures_are_counted_by_reason_and_checkpointed():
    """Failed reward calls arrive as statuses; the buffer counts them by reason across replicas."""
    batch = scored_batch(["a", "b"], N)
    status = ["ok"] * N
    status[:3] = ["failed:timeout", "failed:exception:ValueError", "failed:timeout"]
    rewards = np.where(np.array(status) == "ok", 1.0, np.nan).astype(np.float32)
    batch.groups[0] = wire.ScoredGroup.from_rollout(batch.groups[0], rewards, status)
    buffer = make_buffer()
    asyncio.run(buffer.put(wire.encode(batch)))
    assert buffer.status().reward_failures == {"timeout": 2, "exception:ValueError": 1}
    restored = make_buffer()
    restored.load_state_dict(buffer.state_dict())
    assert restored.status().reward_failures == {"timeout": 2, "exception:ValueError": 1}
