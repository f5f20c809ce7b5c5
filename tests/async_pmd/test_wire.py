"""The wire format (async_pmd.wire): exact round trips, zero-copy reads, and refusal of bad bytes.

Contract pinned here: every message round-trips exactly (dtypes, strings, ints, empty responses);
decoded arrays are read-only views of the input; any malformed input raises WireError and nothing
else; encode refuses what decode would refuse.
"""
import dataclasses
import subprocess
import sys

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from async_pmd import wire
from async_pmd.wire import (
    DEFAULT_MAX_BYTES, FORMAT_VERSION, MAGIC, GenerationRequest, NamedTensors, RolloutBatch, RolloutGroup,
    ScoredBatch, ScoredGroup, SegmentBatch, TrainBatch, WireError, decode, encode, encode_array, encode_parts,
    named_tensors_to_wire,
)

# ---------------------------------------------------------------- builders


def make_group(rng, lengths=(3, 0, 5), uid="g0", prompt_len=4) -> RolloutGroup:
    n = len(lengths)
    return RolloutGroup(
        uid=uid,
        prompt_ids=rng.integers(0, 1000, prompt_len, dtype=np.int32),
        response_ids=[rng.integers(0, 1000, k, dtype=np.int32) for k in lengths],
        logprobs=[-rng.random(k, dtype=np.float32) for k in lengths],
        finish_reasons=["stop", "length", "abort"][:n] + ["stop"] * max(0, n - 3),
        policy_version=7,
        prompt_text="What is 2+2? ünïcode ✓",
        response_texts=[f"answer {j}" for j in range(n)],
        answer="4",
        sample_index=12,
        extra={"source": "gsm8k", "difficulty": 0.5, "level": 3, "flag": True, "none": None},
    )


def make_scored(rng, lengths=(3, 0, 5), uid="g0") -> ScoredGroup:
    n = len(lengths)
    rewards = rng.random(n).astype(np.float32)
    status = ["ok"] * n
    rewards[-1], status[-1] = np.nan, "failed:timeout"
    return ScoredGroup.from_rollout(make_group(rng, lengths, uid), rewards, status,
                                    {"format": [1.0] * n, "steps": [2] * n})


def make_train(rng, batch=4, prompt_len=5, response_len=6) -> TrainBatch:
    shape = (batch, response_len)
    return TrainBatch(
        prompts=rng.integers(0, 100, (batch, prompt_len), dtype=np.int32),
        responses=rng.integers(0, 100, shape, dtype=np.int32),
        response_mask=(rng.random(shape) > 0.3).astype(np.float32),
        attention_mask=np.ones((batch, prompt_len + response_len), np.int8),
        old_log_probs=-rng.random(shape, dtype=np.float32),
        advantages=rng.standard_normal(shape, dtype=np.float32),
        partition_weights=np.ones(shape, np.float32),
        rewards=rng.random(batch, dtype=np.float32),
        policy_versions=np.arange(batch, dtype=np.int64),
        uids=[f"g{b // 2}" for b in range(batch)],
        learner_step=3,
    )


def make_named(rng) -> NamedTensors:
    arrays = [rng.standard_normal((3, 4)).astype(np.float32), np.arange(5, dtype=np.int64),
              np.array([True, False]), np.array(1.5, np.float16),
              np.array([0x3F80, 0xC000], np.uint16), np.zeros((0, 3), np.float64)]
    return NamedTensors(version=2, names=["w", "idx", "mask", "scale", "bf", "empty"],
                        arrays=arrays, dtypes=["float32", "int64", "bool", "float16", "bfloat16", "float64"])


def messages():
    rng = np.random.default_rng(0)
    return {
        "rollout": RolloutBatch(groups=[make_group(rng), make_group(rng, (4,), "one"),
                                        make_group(rng, (0, 0), "empty", prompt_len=0)]),
        "rollout_no_groups": RolloutBatch(groups=[]),
        "scored": ScoredBatch(groups=[make_scored(rng), make_scored(rng, (2,), "one")]),
        "train": make_train(rng),
        "train_bool_mask": TrainBatch(**{**vars(make_train(rng)),
                                         "attention_mask": np.ones((4, 11), bool)}),
        "train_empty": make_train(rng, batch=0, response_len=0),
        "named": make_named(rng),
        "rollout_segmented": RolloutBatch(groups=[make_segmented(rng)]),
        "segments": make_segments(rng),
    }


def make_segmented(rng) -> RolloutGroup:
    """Responses of 3, 0 and 5 tokens: the first in two segments (v7, v9), the last in three."""
    return dataclasses.replace(
        make_group(rng), segment_lengths=[np.array(x, np.int32) for x in ([1, 2], [0], [2, 2, 1])],
        segment_versions=[np.array(x, np.int64) for x in ([7, 9], [8], [7, 8, 9])])


def make_segments(rng, lengths=(2, 0, 3)) -> SegmentBatch:
    return SegmentBatch(uids=["g0", "g0", "g1"], response_indices=[0, 3, 1],
                        response_ids=[rng.integers(0, 100, n, dtype=np.int32) for n in lengths],
                        logprobs=[-rng.random(n, dtype=np.float32) for n in lengths],
                        finish_reasons=["length", "stop", "length"], policy_versions=[4, 4, 5])


def assert_same(a, b, path="msg"):
    """Field-by-field equality; arrays must agree in dtype and shape too (NaN == NaN)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, path
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), path
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), path
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} != {b!r}"


def all_arrays(msg):
    if isinstance(msg, np.ndarray):
        yield msg
    elif isinstance(msg, list):
        for x in msg:
            yield from all_arrays(x)
    elif dataclasses.is_dataclass(msg):
        for f in dataclasses.fields(msg):
            yield from all_arrays(getattr(msg, f.name))


# The layout, written again from the module docstring, to build hostile but well-framed bytes.

def explode(buf: bytes) -> tuple[dict, bytes]:
    """(header, data section) of a message."""
    header_len = int.from_bytes(buf[6:10], "little")
    header = msgpack.unpackb(buf[10:10 + header_len])
    return header, buf[-(-(10 + header_len) // 64) * 64:]


def frame(header, data: bytes, magic=MAGIC, version=FORMAT_VERSION) -> bytes:
    head = msgpack.packb(header)
    start = -(-(10 + len(head)) // 64) * 64
    prefix = magic + version.to_bytes(2, "little") + len(head).to_bytes(4, "little") + head
    return prefix + bytes(start - len(prefix)) + data


def build(kind: str, meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """A well-framed message of any content, bypassing encode's checks."""
    table, data = {}, b""
    for name, a in arrays.items():
        data += bytes(-len(data) % 64)
        dtype = "bfloat16" if name == "bf" else a.dtype.name
        table[name] = [dtype, list(a.shape), len(data), a.nbytes]
        data += a.tobytes()
    return frame({"kind": kind, "meta": meta, "arrays": table}, data)


def parts(buf: bytes) -> tuple[str, dict, dict[str, np.ndarray]]:
    """(kind, meta, writable arrays) of a message, for build() after tampering."""
    header, data = explode(buf)
    arrays = {name: np.frombuffer(data, "uint16" if dt == "bfloat16" else dt, int(np.prod(shape)), off)
              .reshape(shape).copy() for name, (dt, shape, off, _) in header["arrays"].items()}
    return header["kind"], header["meta"], arrays


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", list(messages()))
def test_round_trip_is_exact(name):
    msg = messages()[name]
    buf = encode(msg)
    assert isinstance(buf, bytes) and buf[:4] == MAGIC
    back = decode(buf, expect=type(msg))
    if isinstance(msg, NamedTensors):  # the only field with a default the wire makes explicit
        assert back.names == msg.names and back.dtypes == msg.dtypes and back.version == msg.version
        assert_same(msg.arrays, back.arrays)
    else:
        assert_same(msg, back)
    assert encode(back) == buf


def test_encode_array_holds_the_same_bytes():
    for msg in messages().values():
        array = encode_array(msg)
        assert array.dtype == np.uint8 and array.ndim == 1
        assert array.tobytes() == encode(msg)
    with pytest.raises(WireError, match="max_bytes"):
        encode_array(messages()["train"], max_bytes=100)


def test_parts_are_the_same_message_without_a_copy():
    """encode_parts: the head (prefix, header, padding) then each array's bytes as a view of the
    array itself; decoding the parts gives what decoding the joined bytes gives."""
    for msg in messages().values():
        whole, head_and_arrays = encode(msg), encode_parts(msg)
        head = head_and_arrays[0]
        assert all(p.dtype == np.uint8 and p.ndim == 1 for p in head_and_arrays)
        assert whole.startswith(head.tobytes())
        header, _ = explode(whole)
        for part, (_, shape, offset, nbytes) in zip(head_and_arrays[1:], header["arrays"].values()):
            assert part.tobytes() == whole[len(head) + offset:len(head) + offset + nbytes]
        back = decode(head_and_arrays, expect=type(msg))
        assert encode(back) == whole
    msg = make_named(np.random.default_rng(0))
    views = encode_parts(msg)[1:]
    assert views[0].ctypes.data == msg.arrays[0].ctypes.data  # no copy on the way out
    back = decode(encode_parts(msg), expect=NamedTensors)
    assert back.arrays[0].ctypes.data == msg.arrays[0].ctypes.data  # nor on the way in
    assert not back.arrays[0].flags.writeable


def test_arrays_back_to_back_in_one_buffer_go_as_one_part():
    """Tensors that share a storage (DeepSpeed's flat ZeRO buffer) come out of
    named_tensors_to_wire as views of one array, and encode_parts hands each run of them that lies
    back to back in the message as one part, a view of the storage: no copy, and fewer, larger
    parts for Ray to write. A tensor of its own, one whose size breaks the 64-byte layout, or one
    of another storage ends a run. The parts decode to the same message, zero-copy."""
    import torch

    flat = torch.randn(1024)
    state = {"a": flat[:16], "b": flat[16:48].view(4, 8), "c": flat[48:49],  # c: 4 bytes, so d is not next
             "d": flat[64:80], "e": flat[80:96], "own": torch.randn(3), "f": flat[96:112],
             "bf16": flat[112:128].to(torch.bfloat16), "empty": flat[128:128], "g": flat[128:144]}
    flat16 = torch.randn(64).to(torch.bfloat16)  # a bf16 flat buffer, as ZeRO keeps bf16 weights
    state |= {"h1": flat16[:32], "h2": flat16[32:]}
    msg = named_tensors_to_wire(state, 3)
    parts = encode_parts(msg)
    runs = [("a", "b", "c"), ("d", "e"), ("own",), ("f",), ("bf16",), ("empty",), ("g",), ("h1", "h2")]
    assert [p.nbytes for p in parts[1:]] == [sum(state[n].nbytes for n in run) for run in runs]
    assert parts[1].ctypes.data == flat.data_ptr() and parts[2].ctypes.data == flat[64:].data_ptr()
    whole = encode(msg)
    assert b"".join(p.tobytes() for p in parts) != whole  # padding is not sent...
    back = decode(parts, expect=NamedTensors)
    assert encode(back) == whole  # ...but the message is the same
    assert back.arrays[1].ctypes.data == flat[16:].data_ptr() and not back.arrays[1].flags.writeable
    for name, a in back.to_torch().items():
        assert torch.equal(a, state[name].contiguous())
    # a slice's storage and its base's start at one address: each keeps its own bytes
    base = np.arange(64, dtype=np.float32)
    aliased = named_tensors_to_wire({"head": torch.from_numpy(base[:16]), "all": torch.from_numpy(base),
                                     "also_head": torch.from_numpy(base[:16])}, 1)
    assert [a.tolist() for a in decode(encode_parts(aliased)).arrays] == [base[:16].tolist(), base.tolist(),
                                                                          base[:16].tolist()]
    # the same message with one part per array (what a reader of the old layout got) reads the same
    framed = [parts[0], *(a.reshape(-1).view(np.uint8) for a in msg.arrays)]
    assert encode(decode(framed)) == whole


def _named_parts():
    return encode_parts(NamedTensors(version=1, names=["a", "b"],
                                     arrays=[np.arange(6, dtype=np.float32), np.ones(3, np.int64)]))


@pytest.mark.parametrize("case, match", [
    (lambda p: [], "empty"),
    (lambda p: p[:2], "2 parts end before arrays\\['b'\\]"),
    (lambda p: p + [p[1]], "4 parts, but the arrays fill 3"),
    (lambda p: [p[0], p[1][:-4], p[2]], "run past the end of its part"),
    (lambda p: [p[0], np.concatenate([p[1], np.zeros(8, np.uint8)]), p[2]], "parts\\[1\\]: 8 bytes past the end"),
    (lambda p: [p[0], p[1], np.concatenate([p[2], np.zeros(8, np.uint8)])], "8 bytes past the end"),
    # a's 24 bytes, then b at its 64-aligned offset: a run must hold the padding between them
    (lambda p: [p[0], np.concatenate([p[1], p[2]])], "parts\\[1\\]: 24 bytes past the end of its last array"),
    (lambda p: [p[0], p[1], np.ones(3, np.float32)], "uint8"),
    (lambda p: [p[0], p[1], "abc"], "expected bytes"),
    (lambda p: [p[0][:-1], p[1], p[2]], "head"),
    (lambda p: [np.concatenate([p[0], p[1]]), p[2]], "head"),
    (lambda p: [p[1], p[1], p[2]], "prefix"),
])
def test_malformed_parts_raise_wire_error(case, match):
    with pytest.raises(WireError, match=match):
        decode(case(_named_parts()))


def test_parts_respect_max_bytes():
    msg = NamedTensors(version=1, names=["big"], arrays=[np.zeros(2**18, np.float32)])
    with pytest.raises(WireError, match="max_bytes"):
        encode_parts(msg, max_bytes=2**20)
    with pytest.raises(WireError, match="max_bytes"):
        decode(encode_parts(msg, max_bytes=2**21), max_bytes=2**20)
    assert decode(encode_parts(msg, max_bytes=2**21), max_bytes=2**21).nbytes == 2**20


def test_the_documented_layout_rebuilds_the_same_bytes():
    """explode/frame above follow the docstring; they must agree with encode byte for byte."""
    for msg in messages().values():
        buf = encode(msg)
        assert frame(*explode(buf)) == buf
        kind, meta, arrays = parts(buf)
        assert build(kind, meta, arrays) == buf


def test_rollout_batch_is_flat_and_helpers():
    batch = messages()["rollout"]
    header, _ = explode(encode(batch))
    assert set(header["arrays"]) == {"prompt_tokens", "prompt_offsets", "response_tokens",
                                     "logprobs", "response_offsets", "segment_lengths",
                                     "segment_versions", "segment_offsets"}
    assert header["arrays"]["response_tokens"][1] == [3 + 0 + 5 + 4]
    assert batch.num_responses == 6 and batch.groups[0].n == 3
    assert batch.groups[0].response_lengths.tolist() == [3, 0, 5]
    train = messages()["train"]
    assert (train.batch_size, train.prompt_len, train.response_len) == (4, 5, 6)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: np.frombuffer(b, np.uint8)])
def test_decoded_arrays_are_read_only_views_of_the_input(wrap):
    for msg in messages().values():
        buf = wrap(bytearray(encode(msg)))
        base = np.frombuffer(buf, np.uint8)
        whole = isinstance(msg, (TrainBatch, NamedTensors))  # not slices of a flat array
        for a in all_arrays(decode(buf)):
            assert not a.flags.writeable
            if a.size:
                assert np.shares_memory(a, base)
                assert not whole or (a.ctypes.data - base.ctypes.data) % 64 == 0


def test_encode_coerces_numpy_scalars():
    msg = make_train(np.random.default_rng(1))
    msg = TrainBatch(**{**vars(msg), "learner_step": np.int64(9)})
    assert decode(encode(msg)).learner_step == 9


# ---------------------------------------------------------------- refusals: decode

def small_rollout() -> bytes:
    rng = np.random.default_rng(3)
    return encode(RolloutBatch(groups=[make_group(rng, (2, 1))]))


def test_every_truncation_is_refused():
    buf = small_rollout()
    for k in range(len(buf)):
        with pytest.raises(WireError):
            decode(buf[:k])


def retyped(buf, fn):
    kind, meta, arrays = parts(buf)
    fn(meta, arrays)
    return build(kind, meta, arrays)


def with_header(buf, fn):
    header, data = explode(buf)
    fn(header)
    return frame(header, data)


def set_item(d, key, value):
    d[key] = value


TRAIN = encode(make_train(np.random.default_rng(4)))
SCORED = encode(ScoredBatch(groups=[make_scored(np.random.default_rng(5))]))
NAMED = encode(make_named(np.random.default_rng(6)))
ROLLOUT = small_rollout()

MALFORMED = {
    "empty": lambda: b"",
    "garbage": lambda: np.random.default_rng(7).bytes(300),
    "wrong magic": lambda: b"PMDA" + ROLLOUT[4:],
    "wrong version": lambda: ROLLOUT[:4] + (FORMAT_VERSION + 1).to_bytes(2, "little") + ROLLOUT[6:],
    "header length past end": lambda: ROLLOUT[:6] + (10**9).to_bytes(4, "little") + ROLLOUT[10:],
    "trailing bytes": lambda: ROLLOUT + b"\0",
    "header not a map": lambda: frame([1, 2, 3], b""),
    "header not msgpack": lambda: MAGIC + b"\1\0" + (3).to_bytes(4, "little") + b"\xc1\xc1\xc1",
    "ext type in header": lambda: frame({"kind": msgpack.ExtType(1, b"x")}, b""),
    "unknown kind": lambda: with_header(ROLLOUT, lambda h: set_item(h, "kind", "Pickle")),
    "kind not a str": lambda: with_header(ROLLOUT, lambda h: set_item(h, "kind", 3)),
    "unknown meta key": lambda: retyped(ROLLOUT, lambda m, a: set_item(m, "evil", 1)),
    "missing array": lambda: retyped(ROLLOUT, lambda m, a: a.pop("logprobs")),
    "dtype not whitelisted": lambda: with_header(
        ROLLOUT, lambda h: h["arrays"]["logprobs"].__setitem__(0, "complex64")),
    "dtype swapped in whitelist": lambda: with_header(
        ROLLOUT, lambda h: h["arrays"]["logprobs"].__setitem__(0, "int32")),
    "nbytes disagrees with shape": lambda: with_header(
        ROLLOUT, lambda h: h["arrays"]["logprobs"].__setitem__(3, 4)),
    "shape mismatch": lambda: retyped(ROLLOUT, lambda m, a: set_item(a, "logprobs", a["logprobs"][:-1])),
    "array past the end": lambda: with_header(
        ROLLOUT, lambda h: h["arrays"]["response_offsets"].__setitem__(2, 10**6)),
    "offset not aligned": lambda: with_header(
        ROLLOUT, lambda h: h["arrays"]["response_offsets"].__setitem__(2, 1)),
    "arrays overlap": lambda: with_header(
        ROLLOUT, lambda h: h["arrays"]["logprobs"].__setitem__(2, 0)),
    "offsets past the data": lambda: retyped(ROLLOUT, lambda m, a: a["response_offsets"].__setitem__(-1, 99)),
    "offsets not monotone": lambda: retyped(
        ROLLOUT, lambda m, a: set_item(a, "response_offsets", np.array([0, 4, 3]))),
    "offsets wrong dtype": lambda: retyped(
        ROLLOUT, lambda m, a: set_item(a, "response_offsets", a["response_offsets"].astype(np.int32))),
    "n disagrees with lists": lambda: retyped(ROLLOUT, lambda m, a: set_item(m, "n", [3])),
    "n zero": lambda: retyped(ROLLOUT, lambda m, a: set_item(m, "n", [0])),
    "uid not a str": lambda: retyped(ROLLOUT, lambda m, a: set_item(m, "uid", [5])),
    "policy_version negative": lambda: retyped(ROLLOUT, lambda m, a: set_item(m, "policy_version", [-1])),
    "policy_version bool": lambda: retyped(ROLLOUT, lambda m, a: set_item(m, "policy_version", [True])),
    "policy_version too big": lambda: retyped(ROLLOUT, lambda m, a: set_item(m, "policy_version", [2**64 - 1])),
    "finish reason unknown": lambda: retyped(ROLLOUT, lambda m, a: m["finish_reasons"].__setitem__(0, "eos")),
    "extra nested": lambda: retyped(ROLLOUT, lambda m, a: set_item(m, "extra", [{"x": [1]}])),
    "negative token id": lambda: retyped(ROLLOUT, lambda m, a: a["response_tokens"].__setitem__(0, -1)),
    "NaN logprob": lambda: retyped(ROLLOUT, lambda m, a: a["logprobs"].__setitem__(0, np.nan)),
    "inf logprob": lambda: retyped(ROLLOUT, lambda m, a: a["logprobs"].__setitem__(1, -np.inf)),
    "NaN reward with status ok": lambda: retyped(SCORED, lambda m, a: a["rewards"].__setitem__(0, np.nan)),
    "inf reward with failed status": lambda: retyped(SCORED, lambda m, a: a["rewards"].__setitem__(-1, np.inf)),
    "reward status unknown": lambda: retyped(SCORED, lambda m, a: m["reward_status"].__setitem__(0, "fine")),
    "reward status failed without reason": lambda: retyped(
        SCORED, lambda m, a: m["reward_status"].__setitem__(0, "failed:")),
    "reward_extra wrong length": lambda: retyped(
        SCORED, lambda m, a: set_item(m, "reward_extra", [{"format": [1.0]}])),
    "train leading dims disagree": lambda: retyped(TRAIN, lambda m, a: set_item(a, "rewards", a["rewards"][:-1])),
    "train R disagrees": lambda: retyped(
        TRAIN, lambda m, a: set_item(a, "advantages", np.zeros((4, 7), np.float32))),
    "train attention mask width": lambda: retyped(
        TRAIN, lambda m, a: set_item(a, "attention_mask", a["attention_mask"][:, 1:].copy())),
    "train attention mask value 2": lambda: retyped(TRAIN, lambda m, a: a["attention_mask"].__setitem__((0, 0), 2)),
    "train response mask 0.5": lambda: retyped(TRAIN, lambda m, a: a["response_mask"].__setitem__((0, 0), 0.5)),
    "train NaN advantage": lambda: retyped(TRAIN, lambda m, a: a["advantages"].__setitem__((1, 2), np.nan)),
    "train uids short": lambda: retyped(TRAIN, lambda m, a: m["uids"].pop()),
    "train float64 rewards": lambda: retyped(TRAIN, lambda m, a: set_item(a, "rewards", a["rewards"].astype(np.float64))),
    "named bool byte 2": lambda: retyped(NAMED, lambda m, a: a["mask"].view(np.uint8).__setitem__(0, 2)),
    "named version missing": lambda: retyped(NAMED, lambda m, a: m.pop("version")),
    "named empty name": lambda: retyped(NAMED, lambda m, a: set_item(a, "", a.pop("w"))),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_raises_wire_error(case):
    with pytest.raises(WireError):
        decode(MALFORMED[case]())


def test_errors_name_the_field():
    cases = {
        "inf logprob": r"RolloutBatch.logprobs: non-finite value at token 1 of groups\[0\].response\[0\]",
        "NaN reward with status ok": r"ScoredBatch.rewards: NaN at groups\[0\].response\[0\], status 'ok'",
        "train leading dims disagree": r"TrainBatch.rewards: expected shape \(4,\), got \(3,\)",
        "wrong magic": "prefix: bad magic",
        "finish reason unknown": r"RolloutBatch.finish_reasons\[0\]: 'eos' is not one of",
    }
    for case, message in cases.items():
        with pytest.raises(WireError, match=message):
            decode(MALFORMED[case]())


@pytest.mark.parametrize("buf", ["text", 5, None, np.zeros(4, np.float32), np.zeros((2, 2), np.uint8)])
def test_non_byte_input_raises_wire_error(buf):
    with pytest.raises(WireError, match="buf"):
        decode(buf)


def test_wrong_kind_and_oversize_are_refused():
    with pytest.raises(WireError, match="expected RolloutBatch, got TrainBatch"):
        decode(TRAIN, expect=RolloutBatch)
    assert isinstance(decode(TRAIN, expect=(RolloutBatch, TrainBatch)), TrainBatch)
    with pytest.raises(WireError, match="max_bytes"):
        decode(TRAIN, max_bytes=len(TRAIN) - 1)
    with pytest.raises(WireError, match="max_bytes"):
        encode(make_train(np.random.default_rng(0)), max_bytes=1000)
    assert DEFAULT_MAX_BYTES == 256 * 2**20


# ---------------------------------------------------------------- refusals: encode

def bad_group(**change) -> RolloutBatch:
    group = make_group(np.random.default_rng(8), (2, 3))
    return RolloutBatch(groups=[RolloutGroup(**{**vars(group), **change})])


ENCODE_REFUSES = {
    "int64 prompt": lambda: bad_group(prompt_ids=np.arange(3)),
    "list prompt": lambda: bad_group(prompt_ids=[1, 2, 3]),
    "logprob length": lambda: bad_group(logprobs=[np.zeros(2, np.float32), np.zeros(2, np.float32)]),
    "NaN logprob": lambda: bad_group(logprobs=[np.zeros(2, np.float32), np.array([0, np.nan, 0], np.float32)]),
    "finish reasons short": lambda: bad_group(finish_reasons=["stop"]),
    "no responses": lambda: bad_group(response_ids=[], logprobs=[], finish_reasons=[], response_texts=[]),
    "extra holds an array": lambda: bad_group(extra={"x": np.zeros(2)}),
    "extra huge int": lambda: bad_group(extra={"x": 2**70}),
    "scored group in rollout batch": lambda: RolloutBatch(groups=[make_scored(np.random.default_rng(0))]),
    "rollout group in scored batch": lambda: ScoredBatch(groups=[make_group(np.random.default_rng(0))]),
    "NaN reward ok": lambda: ScoredBatch(groups=[ScoredGroup.from_rollout(
        make_group(np.random.default_rng(0), (1,)), [np.nan], ["ok"])]),
    "train mask float64": lambda: TrainBatch(**{**vars(make_train(np.random.default_rng(0))),
                                                "response_mask": np.ones((4, 6))}),
    "named duplicate": lambda: NamedTensors(version=0, names=["a", "a"], arrays=[np.zeros(1)] * 2),
    "named object dtype": lambda: NamedTensors(version=0, names=["a"], arrays=[np.array([None])]),
    "named big-endian": lambda: NamedTensors(version=0, names=["a"], arrays=[np.zeros(2, ">f4")]),
    "named bfloat16 not uint16": lambda: NamedTensors(version=0, names=["a"], arrays=[np.zeros(2, np.float32)],
                                                      dtypes=["bfloat16"]),
    "not a message": lambda: make_group(np.random.default_rng(0)),
}


@pytest.mark.parametrize("case", list(ENCODE_REFUSES))
def test_encode_refuses_bad_data(case):
    with pytest.raises(WireError):
        encode(ENCODE_REFUSES[case]())


# ---------------------------------------------------------------- properties

def check_decode(buf) -> None:
    """Any input either raises WireError or decodes to a message that encodes again."""
    try:
        msg = decode(buf)
    except WireError:
        return
    encode(msg)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_random_bytes_only_raise_wire_error(data, framed):
    check_decode(MAGIC + b"\1\0" + data if framed else data)


VALID = [ROLLOUT, SCORED, TRAIN, NAMED]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                        min_size=1, max_size=6), st.integers(-3, 3))
def test_mutated_messages_only_raise_wire_error(buf, edits, resize):
    buf = bytearray(buf)
    header_end = 10 + int.from_bytes(buf[6:10], "little")
    for pos, value in edits:  # mostly in the header, where the structure is
        buf[pos % header_end if pos % 4 else pos % len(buf)] = value
    buf = buf[:len(buf) + resize] if resize < 0 else buf + bytes(resize)
    check_decode(bytes(buf))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                        min_size=1, max_size=6), st.integers(-2, 2))
def test_mutated_parts_only_raise_wire_error(buf, edits, drop):
    """The same edits on the head of a message in parts, and parts dropped or repeated."""
    parts = encode_parts(decode(buf))
    head = bytearray(parts[0].tobytes())
    header_end = 10 + int.from_bytes(head[6:10], "little")
    for pos, value in edits:
        head[pos % header_end if pos % 4 else pos % len(head)] = value
    rest = parts[1:len(parts) + drop] if drop < 0 else parts[1:] + parts[1:1 + drop]
    try:
        msg = decode([bytes(head), *rest])
    except WireError:
        return
    encode(msg)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VALID), st.data())
def test_header_values_replaced_only_raise_wire_error(buf, data):
    header, body = explode(buf)
    part = data.draw(st.sampled_from(["meta", "arrays"]))
    key = data.draw(st.sampled_from(sorted(header[part])))
    header[part][key] = data.draw(msgpack_values)
    check_decode(frame(header, body))


# ---------------------------------------------------------------- torch

def test_bfloat16_named_tensors_round_trip_through_torch():
    torch = pytest.importorskip("torch")
    state = {"w": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(5, requires_grad=True),
             "steps": torch.arange(4), "on": torch.tensor([True, False]), "h": torch.randn(2).half()}
    buf = encode(named_tensors_to_wire(state, version=11), max_bytes=DEFAULT_MAX_BYTES)
    header, _ = explode(buf)
    assert header["arrays"]["w"][0] == "bfloat16"
    msg = decode(buf, expect=NamedTensors)
    assert msg.version == 11 and msg.names == list(state)
    out = msg.to_torch()
    for name, t in state.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t.detach()), name
    out["w"] += 1  # decoded arrays are read-only: to_torch copied them, so this is safe
    assert torch.equal(decode(buf).to_torch()["w"], state["w"])
    # share_readonly: the tensors are the message's memory (no copy), equal, and still read-only.
    ro = decode(buf, expect=NamedTensors)
    shared = ro.to_torch(share_readonly=True)
    for name, t in state.items():
        assert torch.equal(shared[name], t.detach()), name
    assert shared["b"].data_ptr() == ro.arrays[ro.names.index("b")].ctypes.data
    assert not ro.arrays[0].flags.writeable


def test_to_torch_shares_writable_arrays_and_refuses_unknown_dtypes():
    torch = pytest.importorskip("torch")
    a = np.zeros(3, np.float32)
    NamedTensors(version=0, names=["a"], arrays=[a]).to_torch()["a"][0] = 5
    assert a[0] == 5
    with pytest.raises(WireError, match="not carried"):
        encode(named_tensors_to_wire({"c": torch.zeros(2, dtype=torch.complex64)}, version=0))
    with pytest.raises(WireError, match="not carried"):
        named_tensors_to_wire({"f8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, version=0)


def test_large_weights_need_a_larger_max_bytes():
    msg = NamedTensors(version=1, names=["big"], arrays=[np.zeros(2**18, np.float32)])
    with pytest.raises(WireError, match="max_bytes"):
        encode(msg, max_bytes=2**20)
    buf = encode(msg, max_bytes=2**21)
    with pytest.raises(WireError, match="max_bytes"):
        decode(buf, max_bytes=2**20)
    assert decode(buf, max_bytes=2**21).nbytes == 2**20


def test_module_imports_without_torch_or_ray():
    code = "import sys, async_pmd.wire; assert not {'torch', 'ray'} & set(sys.modules), sys.modules.keys()"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- generation request

def _request(**kw):
    base = dict(request_id=7, attempt=1, uids=["u0", "u1"],
                prompt_ids=[np.array([3, 4, 5], np.int32), np.array([9], np.int32)],
                prompt_texts=["3+4=", "9"], answers=["7", "9"], sample_indices=[0, 12],
                extras=[{"task": "add_mod10"}, {}], sampling={"temperature": 0.5, "n": 4})
    base.update(kw)
    return wire.GenerationRequest(**base)


def test_generation_request_round_trip():
    """The driver's request arrives with the same prompts, texts, indices and sampling overrides."""
    got = wire.decode(wire.encode(_request()), expect=wire.GenerationRequest)
    assert got.uids == ["u0", "u1"] and got.request_id == 7 and got.attempt == 1
    assert [p.tolist() for p in got.prompt_ids] == [[3, 4, 5], [9]]
    assert got.prompt_texts == ["3+4=", "9"] and got.answers == ["7", "9"]
    assert got.sample_indices == [0, 12] and got.extras == [{"task": "add_mod10"}, {}]
    assert got.sampling == {"temperature": 0.5, "n": 4}


@pytest.mark.parametrize("kw, field", [
    (dict(uids=["u0", "u0"]), "uids"),
    (dict(attempt=0), "attempt"),
    (dict(prompt_ids=[np.array([1], np.int32), np.array([], np.int32)]), "prompt_ids"),
    (dict(prompt_ids=[np.array([1], np.int64), np.array([2], np.int32)]), "prompt_ids"),
    (dict(sampling={"temprature": 1.0}), "sampling"),
    (dict(extras=[{"x": [1, 2]}, {}]), "extras"),
    (dict(answers=["7"]), "answers"),
])
def test_generation_request_refused(kw, field):
    """A malformed request is refused at the producer with a WireError naming the field."""
    with pytest.raises(wire.WireError, match=field):
        wire.encode(_request(**kw))


def test_segments_round_trip_and_the_group_version_is_the_oldest_segment():
    """A response sampled in segments under several versions keeps each segment's length and
    version across the wire; the group's policy_version must be its oldest segment's."""
    rng = np.random.default_rng(3)
    group = decode(encode(RolloutBatch(groups=[make_segmented(rng)]))).groups[0]
    lengths, versions = group.segments()
    assert [x.tolist() for x in lengths] == [[1, 2], [0], [2, 2, 1]]
    assert [x.tolist() for x in versions] == [[7, 9], [8], [7, 8, 9]]
    plain = make_group(rng)
    assert decode(encode(RolloutBatch(groups=[plain]))).groups[0].segment_lengths is None
    assert [v.tolist() for v in plain.segments()[1]] == [[7]] * 3
    newer = dataclasses.replace(make_segmented(rng), policy_version=8)
    with pytest.raises(WireError, match=r"policy_version\[0\]: 8, but its oldest segment is version 7"):
        encode(RolloutBatch(groups=[newer]))
    short = dataclasses.replace(make_segmented(rng), segment_lengths=[np.array(x, np.int32) for x in
                                                                      ([1, 1], [0], [2, 2, 1])])
    with pytest.raises(WireError, match=r"groups\[0\].response\[0\]: segments hold 2 tokens, the response 3"):
        encode(RolloutBatch(groups=[short]))


def test_a_segment_whose_logprob_count_differs_from_its_tokens_is_refused():
    """Both ways: the producer refuses to encode it, and hand-made bytes with one log-prob too
    few for a segment's tokens are refused by name, not read as a shifted response."""
    rng = np.random.default_rng(4)
    batch = make_segments(rng)
    back = decode(encode(batch), expect=SegmentBatch)
    assert [r.tolist() for r in back.response_ids] == [r.tolist() for r in batch.response_ids]
    assert back.policy_versions == [4, 4, 5] and back.response_indices == [0, 3, 1]
    bad = dataclasses.replace(batch, logprobs=[batch.logprobs[0][:1], *batch.logprobs[1:]])
    with pytest.raises(WireError, match=r"SegmentBatch.logprobs: segment 0 has 1 log-probs for 2 tokens"):
        encode(bad)

    def drop_one_logprob(meta, arrays):
        arrays["logprobs"] = arrays["logprobs"][1:]
        arrays["logprob_offsets"] = np.array([0, 1, 1, 4], np.int64)

    with pytest.raises(WireError, match=r"segment 0 has 1 log-probs for 2 tokens"):
        decode(retyped(encode(batch), drop_one_logprob))


def test_rows_mode_generation_request_round_trips_and_refuses_duplicate_rows():
    """Partial rollouts: a request of response rows (uid, index) with their prefixes and keys."""
    prompt = np.array([5, 6, 7], np.int32)
    request = GenerationRequest(
        request_id=3, attempt=1, uids=["g0", "g0"], prompt_ids=[prompt, prompt], prompt_texts=["p", "p"],
        answers=["a", "a"], sample_indices=[0, 0], extras=[{}, {}], response_indices=[0, 2],
        prefix_ids=[np.array([9, 9], np.int32), np.zeros(0, np.int32)], row_seeds=[2**62, 1])
    back = decode(encode(request), expect=GenerationRequest)
    assert back.rows_mode and back.response_indices == [0, 2] and back.row_seeds == [2**62, 1]
    assert [p.tolist() for p in back.prefix_ids] == [[9, 9], []]
    assert not decode(encode(dataclasses.replace(request, uids=["a", "b"], response_indices=None, prefix_ids=None,
                                                 row_seeds=None))).rows_mode
    with pytest.raises(WireError, match=r"duplicate \(uid, response index\) rows"):
        encode(dataclasses.replace(request, response_indices=[1, 1]))
    with pytest.raises(WireError, match="come together"):
        encode(dataclasses.replace(request, row_seeds=None))
