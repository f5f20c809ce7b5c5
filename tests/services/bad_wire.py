"""Hostile inputs for the boundaries that take wire bytes (GroupBuffer.put, LearnerRank.train_step).

Each builder starts from a valid message and breaks one thing, re-framing the bytes by hand
(the layout of `async_pmd.wire`'s docstring) where `encode` would refuse to produce them.
"""

from __future__ import annotations

import pickle

import msgpack
import numpy as np

from async_pmd import wire
from async_pmd.wire import MAGIC, RolloutBatch, RolloutGroup, ScoredBatch, ScoredGroup, TrainBatch


def rollout_group(uid: str, n: int, response_len: int = 3) -> RolloutGroup:
    return RolloutGroup(
        uid=uid, prompt_ids=np.array([1, 2, 3], np.int32),
        response_ids=[np.full(response_len, 5, np.int32) for _ in range(n)],
        logprobs=[np.full(response_len, -1.0, np.float32) for _ in range(n)],
        finish_reasons=["stop"] * n, policy_version=0, prompt_text="1+2=", response_texts=["3"] * n,
        answer="3", sample_index=0, extra={})


def scored_batch(uids: list[str], n: int, response_len: int = 3) -> ScoredBatch:
    return ScoredBatch(groups=[
        ScoredGroup.from_rollout(rollout_group(u, n, response_len), np.ones(n, np.float32), ["ok"] * n)
        for u in uids])


def train_batch(rows: int = 4, prompt_len: int = 3, response_len: int = 4) -> TrainBatch:
    shape = (rows, response_len)
    return TrainBatch(
        prompts=np.ones((rows, prompt_len), np.int32), responses=np.ones(shape, np.int32),
        response_mask=np.ones(shape, np.float32), attention_mask=np.ones((rows, prompt_len + response_len), np.int8),
        old_log_probs=np.full(shape, -1.0, np.float32), advantages=np.zeros(shape, np.float32),
        partition_weights=np.ones(shape, np.float32), rewards=np.zeros(rows, np.float32),
        policy_versions=np.zeros(rows, np.int64), uids=[f"g{r}" for r in range(rows)], learner_step=0)


def explode(buf: bytes) -> tuple[dict, bytes]:
    """(header, data section) of a message."""
    header_len = int.from_bytes(buf[6:10], "little")
    return msgpack.unpackb(buf[10:10 + header_len]), buf[-(-(10 + header_len) // 64) * 64:]


def frame(header: dict, data: bytes) -> bytes:
    head = msgpack.packb(header)
    start = -(-(10 + len(head)) // 64) * 64
    prefix = MAGIC + wire.FORMAT_VERSION.to_bytes(2, "little") + len(head).to_bytes(4, "little") + head
    return prefix + bytes(start - len(prefix)) + data


def _poke(buf: bytes, array: str, value: float) -> bytes:
    """`buf` with the first float32 of `array` overwritten (a value encode would refuse)."""
    header, data = explode(buf)
    offset = header["arrays"][array][2]
    data = bytearray(data)
    data[offset:offset + 4] = np.float32(value).tobytes()
    return frame(header, bytes(data))


def _reshape(buf: bytes, array: str, shape: list[int]) -> bytes:
    header, data = explode(buf)
    header["arrays"][array][1] = shape
    return frame(header, data)


def hostile(valid: bytes, *, kind: str, oversized: bytes) -> dict[str, object]:
    """Name -> a message a `kind` consumer must refuse; `valid` is a good message of that kind."""
    logprobs = "logprobs" if kind == "ScoredBatch" else "old_log_probs"
    flat_len = explode(valid)[0]["arrays"][logprobs][1]
    wrong_kind = wire.encode(RolloutBatch(groups=[rollout_group("wrong-kind", 8)])) if kind == "ScoredBatch" \
        else wire.encode(scored_batch(["wrong-kind"], 8))
    cases = {
        "truncated": valid[:len(valid) // 2],
        "wrong_version": valid[:4] + (wire.FORMAT_VERSION + 1).to_bytes(2, "little") + valid[6:],
        "wrong_kind": wrong_kind,
        "wrong_shape": _reshape(valid, logprobs, [*flat_len, 1]),
        "oversized": oversized,
        "nan_logprob": _poke(valid, logprobs, float("nan")),
        "inf_logprob": _poke(valid, logprobs, float("inf")),
        "garbage": bytes(range(256)) * 4,
        "pickle": pickle.dumps(wire.decode(valid)),  # never unpickled: bad magic
        "python_object": wire.decode(valid),  # the message object itself, not its bytes
    }
    if kind == "ScoredBatch":
        cases["inf_reward"] = _poke(valid, "rewards", float("inf"))
    return cases
