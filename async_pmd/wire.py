"""The wire format: every message that crosses an actor boundary, as msgpack bytes.

Producers call `encode(msg)`, consumers `decode(buf, expect=Cls)`. Both validate the same schema,
so bad data never leaves a producer and bad bytes are refused at the consumer with a `WireError`
that names the field. Nothing is pickled and nothing executes code on decode.

    GenerationRequest  driver -> generator
    SegmentBatch   generator -> driver (partial rollouts: one segment per response row)
    RolloutBatch   generator -> scorer (or driver -> scorer, groups assembled from segments)
    ScoredBatch    scorer -> GroupBuffer
    TrainBatch     GroupBuffer -> learner
    NamedTensors   learner -> WeightStore -> generators

Layout of one message (little-endian; hosts are assumed little-endian):

    0        b"APMD"                 magic
    4        u16 FORMAT_VERSION
    6        u32 header length H
    10       msgpack header, H bytes: {"kind": str, "meta": {field: value},
                                       "arrays": {name: [dtype, shape, offset, nbytes]}}
    D        data, D = align64(10 + H): each array's C-order bytes at D + offset, every offset a
             multiple of 64 and past the previous array's end; the message ends where the last
             array ends.

A message may also travel in parts (`encode_parts`, the weights' form): the bytes up to D, then
the data as buffers in table order, each holding the message's bytes from one array's offset to
the end of the last array it holds (one array, or a run of them back to back); the header is the
same, so `decode` checks the parts against it as it checks one buffer.

`decode` reads arrays with `np.frombuffer` over the input, so they are zero-copy, read-only views
that keep the input alive: copy one before writing to it. Ragged data travels flat (values plus
int64 offsets of length count + 1), never as many small arrays.
"""
from __future__ import annotations

import math
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import ClassVar

import msgpack
import numpy as np

__all__ = [
    "DEFAULT_MAX_BYTES", "FINISH_REASONS", "FORMAT_VERSION", "GenerationRequest", "MAGIC", "NamedTensors",
    "RolloutBatch", "RolloutGroup", "ScoredBatch", "ScoredGroup", "SegmentBatch", "TrainBatch", "WireError",
    "decode", "encode", "encode_array", "encode_parts", "named_tensors_to_wire",
]

MAGIC = b"APMD"
FORMAT_VERSION = 2  # 2: rollout groups carry their segments
# Batches stay far below this; weights are larger and their callers pass their own max_bytes.
DEFAULT_MAX_BYTES = 256 * 2**20
FINISH_REASONS = frozenset({"stop", "length", "abort"})

_PREFIX = struct.Struct("<4sHI")
_ALIGN = 64  # a cache line, and a multiple of every dtype's alignment
_MAX_NDIM = 8
_INT_RANGE = (-(2**63), 2**63)  # what every consumer can hold in an int64
# wire dtype name -> numpy storage dtype; bfloat16 travels as its raw uint16 bits
_DTYPES = {n: np.dtype(n) for n in ("int8", "int16", "int32", "int64", "uint8", "uint16",
                                    "float16", "float32", "float64", "bool")}
_DTYPES["bfloat16"] = np.dtype(np.uint16)
_SCALARS = (type(None), bool, int, float, str)


class WireError(ValueError):
    """A message that does not follow the schema; the text names the field at fault."""


# ---------------------------------------------------------------- checks (shared by both ways)

def _fail(where: str, what: str):
    raise WireError(f"{where}: {what}")


def _keys(where: str, d, expected: tuple[str, ...]) -> None:
    if not isinstance(d, dict):
        _fail(where, f"expected a map, got {type(d).__name__}")
    if set(d) != set(expected):
        missing, unknown = set(expected) - set(d), set(d) - set(expected)
        _fail(where, f"missing {sorted(missing)}, unknown {sorted(map(repr, unknown))}")


def _int(where: str, x, lo: int = 0) -> int:
    if type(x) is not int or not (max(lo, _INT_RANGE[0]) <= x < _INT_RANGE[1]):
        _fail(where, f"expected an int >= {lo}, got {x!r}")
    return x


def _list(where: str, xs, n: int | None) -> list:
    if not isinstance(xs, list):
        _fail(where, f"expected a list, got {type(xs).__name__}")
    if n is not None and len(xs) != n:
        _fail(where, f"expected {n} entries, got {len(xs)}")
    return xs


def _int_list(where: str, xs, n: int, lo: int = 0) -> list[int]:
    for i, x in enumerate(_list(where, xs, n)):
        _int(f"{where}[{i}]", x, lo)
    return xs


def _str_list(where: str, xs, n: int | None = None) -> list[str]:
    for i, x in enumerate(_list(where, xs, n)):
        if not isinstance(x, str):
            _fail(f"{where}[{i}]", f"expected str, got {type(x).__name__}")
    return xs


def _scalar_map(where: str, d) -> None:
    """`extra` maps: str keys, msgpack-native scalar values (None, bool, int64, float, str)."""
    if not isinstance(d, dict):
        _fail(where, f"expected a map, got {type(d).__name__}")
    for k, v in d.items():
        if not isinstance(k, str):
            _fail(where, f"key {k!r} is not a str")
        if not (isinstance(v, _SCALARS) and (type(v) is not int or _is_number(v))):
            _fail(f"{where}[{k!r}]", f"expected None/bool/int64/float/str, got {v!r:.60}")


def _is_number(v) -> bool:
    return isinstance(v, float) or (type(v) is int and _INT_RANGE[0] <= v < _INT_RANGE[1])


def _array(where: str, a, dtypes, shape: tuple) -> np.ndarray:
    """`a` is an ndarray of one of `dtypes` whose shape matches `shape` (None = any length)."""
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    if not isinstance(a, np.ndarray):
        _fail(where, f"expected an ndarray, got {type(a).__name__}")
    if a.dtype not in dtypes:
        got = a.dtype.name if a.dtype.isnative else a.dtype.str
        _fail(where, f"expected dtype {'/'.join(np.dtype(d).name for d in dtypes)}, got {got}")
    if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
        expected = tuple("*" if s is None else s for s in shape)
        _fail(where, f"expected shape {expected}, got {a.shape}")
    return a


def _finite(where: str, a: np.ndarray) -> None:
    finite = np.isfinite(a)
    if not finite.all():
        index = [int(i) for i in np.unravel_index(np.argmin(finite), a.shape)]
        _fail(where, f"non-finite value at index {index}")


def _nonneg(where: str, a: np.ndarray) -> None:
    if a.size and a.min() < 0:
        _fail(where, "negative value (token ids, versions are >= 0)")


def _binary(where: str, a: np.ndarray) -> None:
    if a.dtype.itemsize == 1:  # int8 / bool masks: as bytes, one reduction and no temporaries
        bad = a.size and a.view(np.uint8).max() > 1
    else:
        bad = not ((a == 0) | (a == 1)).all()
    if bad:
        _fail(where, "values other than 0 and 1")


def _offsets(where: str, off, count: int, total: int) -> np.ndarray:
    """Offsets of `count` ragged rows into a flat array of `total` values."""
    _array(where, off, np.int64, (count + 1,))
    if off[0] != 0 or off[-1] != total:
        _fail(where, f"must start at 0 and end at {total}, got {off[0]}..{off[-1]}")
    if (off[1:] < off[:-1]).any():
        _fail(where, "not monotone")
    return off


# ---------------------------------------------------------------- rollout groups

@dataclass(frozen=True, eq=False, kw_only=True)
class RolloutGroup:
    """The n responses to one prompt, as sampled. Built by a generator replica.

    Invariants: prompt_ids is int32[P] (token ids >= 0); response_ids, logprobs, finish_reasons and
    response_texts have n >= 1 entries each; response_ids[j] is int32[L_j] (L_j may be 0) and
    logprobs[j] is float32[L_j], finite (the behaviour policy's log-probs, the OPMD anchor);
    finish_reasons are in FINISH_REASONS; policy_version >= 0 is the weights that sampled it;
    sample_index >= 0 is the prompt's position in its data source; extra holds scalars only.

    Segments (partial rollouts): response j was sampled in pieces, segment_lengths[j] int32[S_j]
    tokens each (S_j >= 1, summing to L_j) under segment_versions[j] int64[S_j]; policy_version is
    then the oldest segment's version, which the buffer's staleness uses. None (the default) is
    one segment per response at policy_version, and decoding gives None for exactly that case.
    """

    uid: str
    prompt_ids: np.ndarray
    response_ids: list[np.ndarray]
    logprobs: list[np.ndarray]
    finish_reasons: list[str]
    policy_version: int
    prompt_text: str
    response_texts: list[str]
    answer: str
    sample_index: int
    extra: dict = field(default_factory=dict)
    segment_lengths: list[np.ndarray] | None = None
    segment_versions: list[np.ndarray] | None = None

    @property
    def n(self) -> int:
        return len(self.response_ids)

    def segments(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(segment_lengths, segment_versions), one entry per response (see the class docstring)."""
        if self.segment_lengths is not None and self.segment_versions is not None:
            return self.segment_lengths, self.segment_versions
        return ([np.array([len(r)], np.int32) for r in self.response_ids],
                [np.array([self.policy_version], np.int64) for _ in self.response_ids])

    @property
    def response_lengths(self) -> np.ndarray:
        return np.array([len(r) for r in self.response_ids], np.int64)


@dataclass(frozen=True, eq=False, kw_only=True)
class ScoredGroup(RolloutGroup):
    """A RolloutGroup with its rewards. Built by a scorer replica, consumed by the GroupBuffer.

    Invariants (beyond RolloutGroup's): rewards is float32[n]; reward_status[j] is "ok" or
    "failed:<reason>"; rewards[j] is finite where the status is "ok" and may be NaN (never inf)
    where it failed; reward_extra maps a name to n numbers (per-response reward components).
    """

    rewards: np.ndarray
    reward_status: list[str]
    reward_extra: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def from_rollout(cls, group: RolloutGroup, rewards, reward_status: list[str],
                     reward_extra: dict[str, list[float]] | None = None) -> ScoredGroup:
        base = {f.name: getattr(group, f.name) for f in fields(RolloutGroup)}
        return cls(**base, rewards=np.asarray(rewards, np.float32),
                   reward_status=list(reward_status), reward_extra=dict(reward_extra or {}))


# A batch of groups travels as columns: per-group scalars and per-response strings in the header,
# the prompts and responses of all groups in flat arrays with offsets.
_PER_GROUP = ("uid", "policy_version", "sample_index", "prompt_text", "answer", "extra")
_PER_RESPONSE = ("finish_reasons", "response_texts")
_GROUP_ARRAYS = ("prompt_tokens", "prompt_offsets", "response_tokens", "logprobs",
                 "response_offsets", "segment_lengths", "segment_versions", "segment_offsets")


def _columns(scored: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(per-group, per-response) header columns."""
    if scored:
        return _PER_GROUP + ("reward_extra",), _PER_RESPONSE + ("reward_status",)
    return _PER_GROUP, _PER_RESPONSE


def _scalar(x):
    """numpy integer scalars a producer may hand us, as the Python ints msgpack packs."""
    return int(x) if isinstance(x, np.integer) else x


def _concat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, dtype)


def _offsets_of(arrays: list[np.ndarray]) -> np.ndarray:
    off = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([len(a) for a in arrays], out=off[1:])
    return off


def _check_group_shapes(where: str, g: RolloutGroup, scored: bool) -> None:
    """What flattening needs (n entries per list, 1-D arrays of the right dtype and length); the
    flat columns carry the other checks."""
    _array(f"{where}.prompt_ids", g.prompt_ids, np.int32, (None,))
    n = len(_list(f"{where}.response_ids", g.response_ids, None))
    for name in _columns(scored)[1] + ("logprobs",):
        _list(f"{where}.{name}", getattr(g, name), n)
    for j, (ids, lp) in enumerate(zip(g.response_ids, g.logprobs)):
        _array(f"{where}.response_ids[{j}]", ids, np.int32, (None,))
        _array(f"{where}.logprobs[{j}]", lp, np.float32, (len(ids),))
    if scored:
        _array(f"{where}.rewards", g.rewards, np.float32, (n,))
    if (g.segment_lengths is None) != (g.segment_versions is None):
        _fail(f"{where}.segment_lengths", "segment_lengths and segment_versions come together")
    lengths, versions = g.segments()
    _list(f"{where}.segment_lengths", lengths, n)
    _list(f"{where}.segment_versions", versions, n)
    for j, (ls, vs) in enumerate(zip(lengths, versions)):
        _array(f"{where}.segment_lengths[{j}]", ls, np.int32, (None,))
        _array(f"{where}.segment_versions[{j}]", vs, np.int64, (len(ls),))


def _groups_to_wire(kind: str, groups, group_cls: type) -> tuple[dict, dict, dict]:
    scored = group_cls is ScoredGroup
    for i, g in enumerate(_list(f"{kind}.groups", groups, None)):
        if type(g) is not group_cls:
            _fail(f"{kind}.groups[{i}]", f"expected {group_cls.__name__}, got {type(g).__name__}")
        _check_group_shapes(f"{kind}.groups[{i}]", g, scored)

    def flat(name: str) -> list:
        return [x for g in groups for x in getattr(g, name)]

    per_group, per_response = _columns(scored)
    meta = {"n": [g.n for g in groups]}
    meta.update({name: [_scalar(getattr(g, name)) for g in groups] for name in per_group})
    meta.update({name: flat(name) for name in per_response})
    responses = flat("response_ids")
    arrays = {
        "prompt_tokens": _concat([g.prompt_ids for g in groups], np.int32),
        "prompt_offsets": _offsets_of([g.prompt_ids for g in groups]),
        "response_tokens": _concat(responses, np.int32),
        "logprobs": _concat(flat("logprobs"), np.float32),
        "response_offsets": _offsets_of(responses),
    }
    segments = [g.segments() for g in groups]
    lengths = [ls for seg in segments for ls in seg[0]]
    arrays["segment_lengths"] = _concat(lengths, np.int32)
    arrays["segment_versions"] = _concat([vs for seg in segments for vs in seg[1]], np.int64)
    arrays["segment_offsets"] = _offsets_of(lengths)
    if scored:
        arrays["rewards"] = _concat([g.rewards for g in groups], np.float32)
    return meta, arrays, {}


def _check_groups(kind: str, meta, arrays, scored: bool) -> None:
    per_group, per_response = _columns(scored)
    _keys(f"{kind} meta", meta, ("n",) + per_group + per_response)
    _keys(f"{kind} arrays", arrays, _GROUP_ARRAYS + (("rewards",) if scored else ()))
    n_groups = len(_str_list(f"{kind}.uid", meta["uid"]))
    counts = _int_list(f"{kind}.n", meta["n"], n_groups, lo=1)
    n_resp = sum(counts)
    _int_list(f"{kind}.policy_version", meta["policy_version"], n_groups)
    _int_list(f"{kind}.sample_index", meta["sample_index"], n_groups)
    _str_list(f"{kind}.prompt_text", meta["prompt_text"], n_groups)
    _str_list(f"{kind}.answer", meta["answer"], n_groups)
    for i, extra in enumerate(_list(f"{kind}.extra", meta["extra"], n_groups)):
        _scalar_map(f"{kind}.extra[{i}]", extra)
    for i, reason in enumerate(_str_list(f"{kind}.finish_reasons", meta["finish_reasons"], n_resp)):
        if reason not in FINISH_REASONS:
            _fail(f"{kind}.finish_reasons[{i}]",
                  f"{reason!r:.40} is not one of {sorted(FINISH_REASONS)}")
    _str_list(f"{kind}.response_texts", meta["response_texts"], n_resp)

    prompts = _array(f"{kind}.prompt_tokens", arrays["prompt_tokens"], np.int32, (None,))
    _nonneg(f"{kind}.prompt_tokens", prompts)
    _offsets(f"{kind}.prompt_offsets", arrays["prompt_offsets"], n_groups, len(prompts))
    tokens = _array(f"{kind}.response_tokens", arrays["response_tokens"], np.int32, (None,))
    _nonneg(f"{kind}.response_tokens", tokens)
    offsets = _offsets(f"{kind}.response_offsets", arrays["response_offsets"], n_resp, len(tokens))
    logprobs = _array(f"{kind}.logprobs", arrays["logprobs"], np.float32, tokens.shape)
    finite = np.isfinite(logprobs)
    if not finite.all():
        token = int(np.argmin(finite))
        response = int(np.searchsorted(offsets, token, "right")) - 1
        _fail(f"{kind}.logprobs", f"non-finite value at token {token - offsets[response]} "
                                  f"of {_locate(counts, response)}")
    _check_segments(kind, meta, arrays, counts, offsets)
    if scored:
        _check_rewards(kind, meta, arrays["rewards"], counts)


def _check_segments(kind: str, meta: dict, arrays: dict, counts: list[int], response_offsets) -> None:
    """Each response's segments: at least one, token counts summing to its length, versions >= 0,
    and each group's policy_version its oldest segment's."""
    lengths = _array(f"{kind}.segment_lengths", arrays["segment_lengths"], np.int32, (None,))
    _nonneg(f"{kind}.segment_lengths", lengths)
    versions = _array(f"{kind}.segment_versions", arrays["segment_versions"], np.int64, lengths.shape)
    _nonneg(f"{kind}.segment_versions", versions)
    off = _offsets(f"{kind}.segment_offsets", arrays["segment_offsets"], sum(counts), len(lengths))
    per_response = np.diff(off)
    if (per_response < 1).any():
        _fail(f"{kind}.segment_offsets", f"{_locate(counts, int(np.argmin(per_response)))} has no segment")
    if not len(lengths):
        return
    sums = np.add.reduceat(lengths.astype(np.int64), off[:-1])
    bad = np.flatnonzero(sums != np.diff(response_offsets))
    if len(bad):
        r = int(bad[0])
        _fail(f"{kind}.segment_lengths", f"{_locate(counts, r)}: segments hold {int(sums[r])} tokens, "
                                         f"the response {int(response_offsets[r + 1] - response_offsets[r])}")
    oldest = np.minimum.reduceat(versions, off[:-1])
    group_start = np.cumsum([0] + counts[:-1])
    group_oldest = np.minimum.reduceat(oldest, group_start)
    for i, (have, want) in enumerate(zip(meta["policy_version"], group_oldest.tolist())):
        if have != want:
            _fail(f"{kind}.policy_version[{i}]", f"{have}, but its oldest segment is version {want}")


def _check_rewards(kind: str, meta: dict, rewards, counts: list[int]) -> None:
    status = _str_list(f"{kind}.reward_status", meta["reward_status"], sum(counts))
    for i, s in enumerate(status):
        if s != "ok" and not (s.startswith("failed:") and len(s) > len("failed:")):
            _fail(f"{kind}.reward_status[{i}]",
                  f"expected 'ok' or 'failed:<reason>', got {s!r:.40}")
    rewards = _array(f"{kind}.rewards", rewards, np.float32, (len(status),))
    if np.isinf(rewards).any():
        _fail(f"{kind}.rewards", f"inf at {_locate(counts, int(np.argmax(np.isinf(rewards))))}")
    nan_ok = np.isnan(rewards) & np.array([s == "ok" for s in status], bool)
    if nan_ok.any():
        _fail(f"{kind}.rewards", f"NaN at {_locate(counts, int(np.argmax(nan_ok)))}, status 'ok'")
    reward_extra = _list(f"{kind}.reward_extra", meta["reward_extra"], len(counts))
    for i, (extra, n) in enumerate(zip(reward_extra, counts)):
        if not isinstance(extra, dict):
            _fail(f"{kind}.reward_extra[{i}]", f"expected a map, got {type(extra).__name__}")
        for name, values in extra.items():
            where = f"{kind}.reward_extra[{i}][{name!r:.40}]"
            if not isinstance(name, str):
                _fail(where, "key is not a str")
            if not all(_is_number(v) for v in _list(where, values, n)):
                _fail(where, "expected numbers (int64 or float)")


def _locate(counts: list[int], response: int) -> str:
    """'groups[g].response[j]' for the flat index of a response, for error messages."""
    group = int(np.searchsorted(np.cumsum(counts), response, "right"))
    return f"groups[{group}].response[{response - sum(counts[:group])}]"


def _groups_from_wire(meta: dict, arrays: dict, group_cls: type) -> list:
    """Groups whose arrays are views into the message (slices of the flat arrays)."""
    per_group, per_response = _columns(group_cls is ScoredGroup)
    prompts, p_off = arrays["prompt_tokens"], arrays["prompt_offsets"].tolist()
    r_off = arrays["response_offsets"].tolist()
    spans = list(zip(r_off[:-1], r_off[1:]))
    tokens = [arrays["response_tokens"][a:b] for a, b in spans]
    logprobs = [arrays["logprobs"][a:b] for a, b in spans]
    s_off = arrays["segment_offsets"]
    # A group whose every response is one segment at the group's version (every group without
    # partial rollouts) gets the default, no segment arrays: decided for all groups at once.
    counts = np.asarray(meta["n"], np.int64)
    one_piece = (np.diff(s_off) == 1) & (arrays["segment_versions"][s_off[:-1]]
                                        == np.repeat(np.asarray(meta["policy_version"], np.int64), counts))
    group_one_piece = np.logical_and.reduceat(one_piece, np.cumsum(counts) - counts) if len(counts) else one_piece
    s_off = s_off.tolist()
    groups, r = [], 0
    for i, n in enumerate(meta["n"]):
        kw = {name: meta[name][i] for name in per_group}
        kw.update({name: meta[name][r:r + n] for name in per_response})
        if group_cls is ScoredGroup:
            kw["rewards"] = arrays["rewards"][r:r + n]
        if not group_one_piece[i]:
            spans = list(zip(s_off[r:r + n], s_off[r + 1:r + n + 1]))
            kw.update(segment_lengths=[arrays["segment_lengths"][a:b] for a, b in spans],
                      segment_versions=[arrays["segment_versions"][a:b] for a, b in spans])
        groups.append(group_cls(**kw, prompt_ids=prompts[p_off[i]:p_off[i + 1]],
                                response_ids=tokens[r:r + n], logprobs=logprobs[r:r + n]))
        r += n
    return groups


class _GroupBatch:
    """The codec RolloutBatch and ScoredBatch share: all their groups travel as one message."""

    _group_cls: ClassVar[type]
    groups: list

    @property
    def num_responses(self) -> int:
        return sum(g.n for g in self.groups)

    def _to_wire(self):
        return _groups_to_wire(type(self).__name__, self.groups, self._group_cls)

    @classmethod
    def _check_wire(cls, meta, arrays, wire_dtypes) -> None:
        _check_groups(cls.__name__, meta, arrays, scored=cls._group_cls is ScoredGroup)

    @classmethod
    def _from_wire(cls, meta, arrays, wire_dtypes):
        return cls(groups=_groups_from_wire(meta, arrays, cls._group_cls))


@dataclass(frozen=True, eq=False, kw_only=True)
class RolloutBatch(_GroupBatch):
    """Groups sampled by a generator replica, sent to a scorer replica."""

    _group_cls: ClassVar[type] = RolloutGroup
    groups: list[RolloutGroup]


@dataclass(frozen=True, eq=False, kw_only=True)
class ScoredBatch(_GroupBatch):
    """Groups with their rewards, sent by a scorer replica to the GroupBuffer."""

    _group_cls: ClassVar[type] = ScoredGroup
    groups: list[ScoredGroup]


# ---------------------------------------------------------------- segments (partial rollouts)

@dataclass(frozen=True, eq=False, kw_only=True)
class SegmentBatch:
    """One segment per response row of a rows-mode GenerationRequest: generator -> driver.

    Invariants: uids, response_indices, finish_reasons and policy_versions have one entry per row
    (k >= 1); response_ids[i] is int32[L_i] (ids >= 0, L_i may be 0) and logprobs[i] float32[L_i],
    finite: the new tokens of row i and the log-probs they were sampled with, under weights
    policy_versions[i]. On the wire tokens and log-probs have offsets of their own, so a count
    that disagrees is refused by name rather than read as a shifted response.
    """

    uids: list[str]
    response_indices: list[int]
    response_ids: list[np.ndarray]
    logprobs: list[np.ndarray]
    finish_reasons: list[str]
    policy_versions: list[int]

    def _to_wire(self):
        k = len(_list("SegmentBatch.response_ids", self.response_ids, None))
        _list("SegmentBatch.logprobs", self.logprobs, k)
        for i, (ids, lp) in enumerate(zip(self.response_ids, self.logprobs)):
            _array(f"SegmentBatch.response_ids[{i}]", ids, np.int32, (None,))
            _array(f"SegmentBatch.logprobs[{i}]", lp, np.float32, (None,))
        meta = {"uids": self.uids, "finish_reasons": self.finish_reasons,
                "response_indices": [_scalar(x) for x in self.response_indices],
                "policy_versions": [_scalar(x) for x in self.policy_versions]}
        arrays = {"tokens": _concat(list(self.response_ids), np.int32),
                  "token_offsets": _offsets_of(list(self.response_ids)),
                  "logprobs": _concat(list(self.logprobs), np.float32),
                  "logprob_offsets": _offsets_of(list(self.logprobs))}
        return meta, arrays, {}

    @staticmethod
    def _check_wire(meta, arrays, wire_dtypes) -> None:
        where = "SegmentBatch"
        _keys(f"{where} meta", meta, ("uids", "response_indices", "finish_reasons", "policy_versions"))
        _keys(f"{where} arrays", arrays, ("tokens", "token_offsets", "logprobs", "logprob_offsets"))
        k = len(_str_list(f"{where}.uids", meta["uids"]))
        if k < 1:
            _fail(f"{where}.uids", "a batch carries at least one segment")
        _int_list(f"{where}.response_indices", meta["response_indices"], k)
        _int_list(f"{where}.policy_versions", meta["policy_versions"], k)
        for i, reason in enumerate(_str_list(f"{where}.finish_reasons", meta["finish_reasons"], k)):
            if reason not in FINISH_REASONS:
                _fail(f"{where}.finish_reasons[{i}]", f"{reason!r:.40} is not one of {sorted(FINISH_REASONS)}")
        tokens = _array(f"{where}.tokens", arrays["tokens"], np.int32, (None,))
        _nonneg(f"{where}.tokens", tokens)
        t_off = _offsets(f"{where}.token_offsets", arrays["token_offsets"], k, len(tokens))
        logprobs = _array(f"{where}.logprobs", arrays["logprobs"], np.float32, (None,))
        _finite(f"{where}.logprobs", logprobs)
        lp_off = _offsets(f"{where}.logprob_offsets", arrays["logprob_offsets"], k, len(logprobs))
        mismatch = np.flatnonzero(np.diff(t_off) != np.diff(lp_off))
        if len(mismatch):
            i = int(mismatch[0])
            _fail(f"{where}.logprobs", f"segment {i} has {int(lp_off[i + 1] - lp_off[i])} log-probs "
                                       f"for {int(t_off[i + 1] - t_off[i])} tokens")

    @classmethod
    def _from_wire(cls, meta, arrays, wire_dtypes) -> SegmentBatch:
        t_off, lp_off = arrays["token_offsets"].tolist(), arrays["logprob_offsets"].tolist()
        return cls(**meta, response_ids=[arrays["tokens"][a:b] for a, b in zip(t_off[:-1], t_off[1:])],
                   logprobs=[arrays["logprobs"][a:b] for a, b in zip(lp_off[:-1], lp_off[1:])])


# ---------------------------------------------------------------- train batch

_TRAIN_ARRAYS = ("prompts", "responses", "response_mask", "attention_mask", "old_log_probs",
                 "advantages", "partition_weights", "rewards", "policy_versions")


@dataclass(frozen=True, eq=False, kw_only=True)
class TrainBatch:
    """B padded rows for one learner step, built by the GroupBuffer, consumed by the learner.

    Invariants: prompts int32[B, P] left-padded with the pad token; responses int32[B, R]
    right-padded; response_mask float32[B, R] of 0/1; attention_mask int8 or bool [B, P + R] of
    0/1; old_log_probs (behaviour policy), advantages and partition_weights float32[B, R] and
    rewards float32[B], all finite; policy_versions int64[B] >= 0; uids[b] is row b's group uid;
    learner_step >= 0 is the step this batch is built for.
    """

    prompts: np.ndarray
    responses: np.ndarray
    response_mask: np.ndarray
    attention_mask: np.ndarray
    old_log_probs: np.ndarray
    advantages: np.ndarray
    partition_weights: np.ndarray
    rewards: np.ndarray
    policy_versions: np.ndarray
    uids: list[str]
    learner_step: int

    @property
    def batch_size(self) -> int:
        return self.prompts.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.prompts.shape[1]

    @property
    def response_len(self) -> int:
        return self.responses.shape[1]

    def _to_wire(self):
        meta = {"uids": self.uids, "learner_step": _scalar(self.learner_step)}
        return meta, {name: getattr(self, name) for name in _TRAIN_ARRAYS}, {}

    @staticmethod
    def _check_wire(meta, arrays, wire_dtypes) -> None:
        _keys("TrainBatch meta", meta, ("uids", "learner_step"))
        _keys("TrainBatch arrays", arrays, _TRAIN_ARRAYS)
        def at(name: str, dtypes, shape: tuple) -> np.ndarray:
            return _array(f"TrainBatch.{name}", arrays[name], dtypes, shape)

        batch, prompt_len = at("prompts", np.int32, (None, None)).shape
        response_len = at("responses", np.int32, (batch, None)).shape[1]
        for name in ("prompts", "responses"):
            _nonneg(f"TrainBatch.{name}", arrays[name])
        _binary("TrainBatch.response_mask", at("response_mask", np.float32, (batch, response_len)))
        mask = at("attention_mask", (np.int8, np.bool_), (batch, prompt_len + response_len))
        _binary("TrainBatch.attention_mask", mask)
        for name in ("old_log_probs", "advantages", "partition_weights"):
            _finite(f"TrainBatch.{name}", at(name, np.float32, (batch, response_len)))
        _finite("TrainBatch.rewards", at("rewards", np.float32, (batch,)))
        _nonneg("TrainBatch.policy_versions", at("policy_versions", np.int64, (batch,)))
        _str_list("TrainBatch.uids", meta["uids"], batch)
        _int("TrainBatch.learner_step", meta["learner_step"])

    @classmethod
    def _from_wire(cls, meta, arrays, wire_dtypes) -> TrainBatch:
        return cls(**arrays, **meta)


# ---------------------------------------------------------------- generation request

_SAMPLING_KEYS = frozenset({"temperature", "top_p", "top_k", "max_new_tokens", "n", "seed"})


@dataclass(frozen=True, eq=False, kw_only=True)
class GenerationRequest:
    """A few prompts to sample groups for: sent by the RolloutDriver to a generator replica.

    Invariants: uids, prompt_ids, prompt_texts, answers, sample_indices and extras have one entry
    per prompt (k >= 1); prompt_ids[i] is int32[P_i] with P_i >= 1 and ids >= 0; uids are unique;
    attempt >= 1 counts re-issues of request_id; sampling overrides the replica's configured
    sampling for this request (keys from temperature, top_p, top_k, max_new_tokens, n, seed).

    Rows mode (partial rollouts), when response_indices, prefix_ids and row_seeds are given: each
    entry is one response row (response_indices[i] of group uids[i], so a uid may repeat with
    distinct indices) continued from prompt_ids[i] + prefix_ids[i] (int32, possibly empty) with
    sampling key row_seeds[i] in [0, 2**63); the generator answers with a SegmentBatch.
    """

    request_id: int
    attempt: int
    uids: list[str]
    prompt_ids: list[np.ndarray]
    prompt_texts: list[str]
    answers: list[str]
    sample_indices: list[int]
    extras: list[dict]
    sampling: dict = field(default_factory=dict)
    response_indices: list[int] | None = None
    prefix_ids: list[np.ndarray] | None = None
    row_seeds: list[int] | None = None

    @property
    def rows_mode(self) -> bool:
        return self.response_indices is not None

    def _to_wire(self):
        k = len(_list("GenerationRequest.prompt_ids", self.prompt_ids, None))
        for i, ids in enumerate(self.prompt_ids):
            _array(f"GenerationRequest.prompt_ids[{i}]", ids, np.int32, (None,))
        given = [x is not None for x in (self.response_indices, self.prefix_ids, self.row_seeds)]
        if any(given) and not all(given):
            _fail("GenerationRequest", "response_indices, prefix_ids and row_seeds come together (rows mode)")
        meta = {"request_id": _scalar(self.request_id), "attempt": _scalar(self.attempt),
                "uids": self.uids, "prompt_texts": self.prompt_texts, "answers": self.answers,
                "sample_indices": [_scalar(x) for x in _list("GenerationRequest.sample_indices",
                                                             self.sample_indices, k)],
                "extras": self.extras, "sampling": self.sampling}
        arrays = {"prompt_tokens": _concat(list(self.prompt_ids), np.int32),
                  "prompt_offsets": _offsets_of(list(self.prompt_ids))}
        meta["rows"] = None
        if self.rows_mode:
            prefixes = _list("GenerationRequest.prefix_ids", self.prefix_ids, k)
            for i, ids in enumerate(prefixes):
                _array(f"GenerationRequest.prefix_ids[{i}]", ids, np.int32, (None,))
            meta["rows"] = {"response_indices": [_scalar(x) for x in self.response_indices],
                            "row_seeds": [_scalar(x) for x in self.row_seeds]}
            arrays["prefix_tokens"] = _concat(list(prefixes), np.int32)
            arrays["prefix_offsets"] = _offsets_of(list(prefixes))
        return meta, arrays, {}

    @staticmethod
    def _check_wire(meta, arrays, wire_dtypes) -> None:
        where = "GenerationRequest"
        _keys(f"{where} meta", meta, ("request_id", "attempt", "uids", "prompt_texts", "answers",
                                      "sample_indices", "extras", "sampling", "rows"))
        rows = meta["rows"]
        _keys(f"{where} arrays", arrays, ("prompt_tokens", "prompt_offsets")
              + (("prefix_tokens", "prefix_offsets") if rows is not None else ()))
        _int(f"{where}.request_id", meta["request_id"])
        _int(f"{where}.attempt", meta["attempt"], lo=1)
        k = len(_str_list(f"{where}.uids", meta["uids"]))
        if k < 1:
            _fail(f"{where}.uids", "a request carries at least one prompt")
        if rows is None and len(set(meta["uids"])) != k:
            _fail(f"{where}.uids", "duplicate uids")
        if rows is not None:
            _keys(f"{where}.rows", rows, ("response_indices", "row_seeds"))
            indices = _int_list(f"{where}.rows.response_indices", rows["response_indices"], k)
            if len(set(zip(meta["uids"], indices))) != k:
                _fail(f"{where}.rows", "duplicate (uid, response index) rows")
            for i, seed in enumerate(_int_list(f"{where}.rows.row_seeds", rows["row_seeds"], k)):
                if seed >= 2**63:
                    _fail(f"{where}.rows.row_seeds[{i}]", "must be < 2**63")
            prefix = _array(f"{where}.prefix_tokens", arrays["prefix_tokens"], np.int32, (None,))
            _nonneg(f"{where}.prefix_tokens", prefix)
            _offsets(f"{where}.prefix_offsets", arrays["prefix_offsets"], k, len(prefix))
        _str_list(f"{where}.prompt_texts", meta["prompt_texts"], k)
        _str_list(f"{where}.answers", meta["answers"], k)
        _int_list(f"{where}.sample_indices", meta["sample_indices"], k)
        for i, extra in enumerate(_list(f"{where}.extras", meta["extras"], k)):
            _scalar_map(f"{where}.extras[{i}]", extra)
        _scalar_map(f"{where}.sampling", meta["sampling"])
        unknown = set(meta["sampling"]) - _SAMPLING_KEYS
        if unknown:
            _fail(f"{where}.sampling", f"unknown keys {sorted(unknown)} (known: {sorted(_SAMPLING_KEYS)})")
        tokens = _array(f"{where}.prompt_tokens", arrays["prompt_tokens"], np.int32, (None,))
        _nonneg(f"{where}.prompt_tokens", tokens)
        off = _offsets(f"{where}.prompt_offsets", arrays["prompt_offsets"], k, len(tokens))
        if (off[1:] == off[:-1]).any():
            _fail(f"{where}.prompt_ids", "an empty prompt")

    @classmethod
    def _from_wire(cls, meta, arrays, wire_dtypes) -> GenerationRequest:
        tokens, off = arrays["prompt_tokens"], arrays["prompt_offsets"]
        prompt_ids = [tokens[off[i]:off[i + 1]] for i in range(len(off) - 1)]
        meta = dict(meta)
        rows = meta.pop("rows")
        if rows is None:
            return cls(prompt_ids=prompt_ids, **meta)
        p_tokens, p_off = arrays["prefix_tokens"], arrays["prefix_offsets"]
        prefixes = [p_tokens[p_off[i]:p_off[i + 1]] for i in range(len(p_off) - 1)]
        return cls(prompt_ids=prompt_ids, **meta, prefix_ids=prefixes, **rows)


# ---------------------------------------------------------------- weights

@dataclass(frozen=True, eq=False, kw_only=True)
class NamedTensors:
    """Model weights at one policy version: published by the learner, held by the WeightStore,
    pulled by generator replicas.

    Invariants: names are unique non-empty strs, one array per name, each of a whitelisted dtype;
    dtypes[i] is the wire dtype of arrays[i] ("bfloat16" marks uint16 arrays holding bf16 bits;
    None means each array's own dtype). Weights may exceed DEFAULT_MAX_BYTES: pass max_bytes.
    """

    version: int
    names: list[str]
    arrays: list[np.ndarray]
    dtypes: list[str] | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def to_torch(self, share_readonly: bool = False) -> dict:
        """name -> torch.Tensor. Arrays we may write to are shared with the tensors; read-only ones
        (every decoded array: a view of the message) are copied once, since a tensor written to
        would write the message. `share_readonly`: shared too, for a caller that only reads the
        tensors (copies them into its own): one full copy of the weights fewer."""
        import torch

        out = {}
        with warnings.catch_warnings():  # torch warns of every read-only array it wraps
            warnings.simplefilter("ignore", UserWarning)
            for name, a, wd in zip(self.names, self.arrays, self._wire_dtypes()):
                a = a if a.flags.writeable or share_readonly else a.copy()
                out[name] = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if wd == "bfloat16" \
                    else torch.from_numpy(a)
        return out

    def _wire_dtypes(self) -> list:
        if self.dtypes is not None:
            return self.dtypes
        return [a.dtype.name if isinstance(a, np.ndarray) else None for a in self.arrays]

    def _to_wire(self):
        names = _str_list("NamedTensors.names", self.names)
        _list("NamedTensors.arrays", self.arrays, len(names))
        wire_dtypes = _list("NamedTensors.dtypes", self._wire_dtypes(), len(names))
        if len(set(names)) != len(names):
            _fail("NamedTensors.names", "duplicate names")
        return ({"version": _scalar(self.version)}, dict(zip(names, self.arrays)),
                dict(zip(names, wire_dtypes)))

    @staticmethod
    def _check_wire(meta, arrays, wire_dtypes) -> None:
        _keys("NamedTensors meta", meta, ("version",))
        _int("NamedTensors.version", meta["version"])
        for name, a in arrays.items():
            if not isinstance(name, str) or not name:
                _fail("NamedTensors.names", f"expected a non-empty str, got {name!r:.40}")
            wd = wire_dtypes[name]
            if wd not in _DTYPES:
                _fail(f"NamedTensors[{name!r}]", f"dtype {wd!r} is not carried ({sorted(_DTYPES)})")
            _array(f"NamedTensors[{name!r}]", a, _DTYPES[wd], (None,) * getattr(a, "ndim", 0))

    @classmethod
    def _from_wire(cls, meta, arrays, wire_dtypes) -> NamedTensors:
        return cls(version=meta["version"], names=list(arrays), arrays=list(arrays.values()),
                   dtypes=list(wire_dtypes.values()))


def named_tensors_to_wire(state: dict, version: int) -> NamedTensors:
    """A state dict as NamedTensors; CPU tensors are shared, not copied (encode copies once).
    Tensors that share a storage (DeepSpeed's flat ZeRO ≤ 2 buffer) come as views of one array."""
    import torch

    def storage_of(t):  # two storages may start at one address (a slice's and its base's)
        return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()

    tensors = {name: t.detach().cpu().contiguous() for name, t in state.items()}

    storages = Counter(storage_of(t) for t in tensors.values() if t.nbytes)
    owners: dict[tuple, np.ndarray] = {}  # a storage that several tensors share, as one uint8 array
    names, arrays, dtypes = [], [], []
    for name, t in tensors.items():
        if t.dtype == torch.bfloat16:
            a, wd = t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
        else:
            try:
                a = t.numpy()
            except TypeError as e:  # float8, complex32, ...: numpy has no such dtype
                raise WireError(f"NamedTensors[{name!r}]: {t.dtype} is not carried") from e
            wd = a.dtype.name
        key = storage_of(t)
        if t.nbytes and storages[key] > 1:
            # Views of one array, so that encode_parts can hand a run of them to Ray as one part.
            owner = owners.get(key)
            if owner is None:
                owner = owners[key] = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).numpy()
            at = t.data_ptr() - key[0]
            a = owner[at:at + a.nbytes].view(a.dtype).reshape(a.shape)
        names.append(name)
        arrays.append(a)
        dtypes.append(wd)
    return NamedTensors(version=version, names=names, arrays=arrays, dtypes=dtypes)


# ---------------------------------------------------------------- framing

_KINDS = {cls.__name__: cls for cls in (GenerationRequest, RolloutBatch, ScoredBatch, SegmentBatch,
                                         TrainBatch, NamedTensors)}
# Everything the parser and numpy can raise on hostile input; turned into WireError at the edge.
_MALFORMED = (msgpack.UnpackException, ValueError, TypeError, KeyError, IndexError, OverflowError,
              AttributeError, RecursionError, struct.error)


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _frame(kind: str, meta: dict, arrays: dict, wire_dtypes: dict, max_bytes: int) -> tuple:
    """(prefix + header + padding up to the data, [(position, array bytes)], total size)."""
    table, parts, end = {}, [], 0
    for name, a in arrays.items():
        start = _align(end)
        table[name] = [wire_dtypes.get(name, a.dtype.name), list(a.shape), start, a.nbytes]
        a = a if a.flags.c_contiguous else a.copy(order="C")
        parts.append((start, a.reshape(-1).view(np.uint8)))
        end = start + a.nbytes
    header = msgpack.packb({"kind": kind, "meta": meta, "arrays": table}, use_bin_type=True)
    data_start = _align(_PREFIX.size + len(header))
    if data_start + end > max_bytes:
        _fail(kind, f"{data_start + end} bytes exceeds max_bytes={max_bytes}")
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header
    head += bytes(data_start - len(head))
    return head, [(data_start + start, data) for start, data in parts], data_start + end


def _join(head: bytes, parts: list, total: int) -> bytes:
    pieces, end = [head], len(head)
    for start, data in parts:
        pieces += [bytes(start - end), data]
        end = start + data.nbytes
    return b"".join(pieces)  # the one copy of the data


def _fill(head: bytes, parts: list, total: int) -> np.ndarray:
    out = np.empty(total, np.uint8)
    out[:len(head)] = np.frombuffer(head, np.uint8)
    end = len(head)
    for start, data in parts:
        out[end:start] = 0
        out[start:start + data.nbytes] = data  # the one copy of the data
        end = start + data.nbytes
    return out


def _byte_view(buf) -> memoryview:
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.c_contiguous:
            _fail("buf", f"expected a contiguous 1-D uint8 array, got {buf.dtype} {buf.shape}")
        return memoryview(buf)
    if isinstance(buf, (bytes, bytearray)):
        return memoryview(buf)
    if isinstance(buf, memoryview):
        if not buf.c_contiguous:
            _fail("buf", "memoryview is not contiguous")
        return buf if buf.format == "B" and buf.ndim == 1 else buf.cast("B")
    _fail("buf", f"expected bytes/bytearray/memoryview/uint8 array, got {type(buf).__name__}")


def _read_array(mv: memoryview, where: str, entry, data_start: int, cursor: int, part=None) -> tuple:
    """One array-table entry as a read-only view of `mv` (of `part`, (buffer, the message offset it
    starts at or None when this array opens it, its name), for a message in parts); returns (array,
    wire dtype, end)."""
    if not (isinstance(entry, list) and len(entry) == 4):
        _fail(where, "expected [dtype, shape, offset, nbytes]")
    wd, shape, offset, nbytes = entry
    if not isinstance(wd, str) or wd not in _DTYPES:
        _fail(where, f"dtype {wd!r:.40} is not carried (allowed: {sorted(_DTYPES)})")
    if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM
            and all(type(d) is int and d >= 0 for d in shape)):
        _fail(where, f"bad shape {shape!r:.80}")
    if type(offset) is not int or offset < cursor or offset % _ALIGN:
        _fail(where, f"offset {offset!r:.40} is not 64-aligned past the previous end {cursor}")
    dtype, count = _DTYPES[wd], math.prod(shape)
    if type(nbytes) is not int or nbytes != count * dtype.itemsize:
        _fail(where, f"nbytes {nbytes!r:.40} disagrees with shape {shape} of {wd}")
    if part is not None:
        mv, part_start, part_name = part
        start = 0 if part_start is None else offset - part_start  # None: this array opens its part
        if part_start is not None and start >= mv.nbytes:  # the part ended before this array
            _fail(part_name, f"{part_start + mv.nbytes - cursor} bytes past the end of its last array")
        if start + nbytes > mv.nbytes:
            _fail(where, f"{nbytes} bytes at {start} run past the end of its part ({mv.nbytes} bytes)")
    elif data_start + offset + nbytes > mv.nbytes:
        _fail(where, f"runs past the end of the message ({mv.nbytes} bytes)")
    else:
        start = data_start + offset
    if count:
        a = np.frombuffer(mv, dtype, count, start).reshape(shape)
    else:  # frombuffer refuses an offset at the very end
        a = np.empty(shape, dtype)
    a.flags.writeable = False  # also for bytearray input: consumers share one buffer
    if dtype == np.bool_ and count and a.view(np.uint8).max() > 1:
        _fail(where, "bool bytes other than 0 and 1")
    return a, wd, offset + nbytes


def _unpack(buf, max_bytes: int) -> tuple[str, dict, dict, dict]:
    if isinstance(buf, (list, tuple)):
        return _unpack_parts(buf, max_bytes)
    mv = _byte_view(buf)
    size = mv.nbytes
    if size > max_bytes:
        _fail("message", f"{size} bytes exceeds max_bytes={max_bytes}")
    header, data_start = _header(mv)
    arrays, wire_dtypes, end = {}, {}, 0
    for name, entry in header["arrays"].items():
        where = f"arrays[{name!r:.40}]"
        arrays[name], wire_dtypes[name], end = _read_array(mv, where, entry, data_start, end)
    if data_start + end != size:
        _fail("message", f"{size} bytes, but the layout ends at {data_start + end}")
    return header["kind"], header["meta"], arrays, wire_dtypes


def _unpack_parts(parts, max_bytes: int) -> tuple[str, dict, dict, dict]:
    """A message as `encode_parts` made it: the head (prefix, header, padding) alone, then the data
    in table order, a part opened by each array that does not fall in the one before."""
    if not parts:
        _fail("parts", "empty: expected the head, then the arrays' bytes")
    head = _byte_view(parts[0])
    header, data_start = _header(head)
    if head.nbytes != data_start:
        _fail("parts[0]", f"the head is {head.nbytes} bytes, its header says {data_start}")
    arrays, wire_dtypes, end = {}, {}, 0
    opened, part, part_start, part_end = 0, None, None, 0
    for name, entry in header["arrays"].items():
        where = f"arrays[{name!r:.40}]"
        opens = part is None or end >= part_end  # the part before is used up
        if opens:
            opened += 1
            if opened >= len(parts):
                _fail("parts", f"{len(parts)} parts end before {where}")
            part, part_start = _byte_view(parts[opened]), None
        arrays[name], wire_dtypes[name], end = _read_array(head, where, entry, data_start, end,
                                                           (part, part_start, f"parts[{opened}]"))
        if opens:
            part_start = entry[2]  # checked by _read_array
            part_end = part_start + part.nbytes
        if data_start + end > max_bytes:
            _fail("message", f"{data_start + end} bytes exceeds max_bytes={max_bytes}")
    if opened + 1 != len(parts):
        _fail("parts", f"{len(parts)} parts, but the arrays fill {opened + 1} (with the head)")
    if part is not None and end != part_end:
        _fail(f"parts[{opened}]", f"{part_end - end} bytes past the end of its last array")
    return header["kind"], header["meta"], arrays, wire_dtypes


def _header(mv: memoryview) -> tuple[dict, int]:
    """The checked header of a message and where its data starts."""
    size = mv.nbytes
    if size < _PREFIX.size:
        _fail("prefix", f"truncated: {size} bytes")
    magic, version, header_len = _PREFIX.unpack_from(mv)
    if magic != MAGIC:
        _fail("prefix", f"bad magic {magic!r} (not an async_pmd message)")
    if version != FORMAT_VERSION:
        _fail("prefix", f"format version {version}, this reader speaks {FORMAT_VERSION}")
    if header_len > size - _PREFIX.size:
        _fail("header", f"truncated: length {header_len}, {size - _PREFIX.size} bytes left")
    try:  # limits: nothing in the header can claim more items than it has bytes; no bin, no ext
        header = msgpack.unpackb(
            mv[_PREFIX.size:_PREFIX.size + header_len], raw=False, strict_map_key=True,
            max_str_len=header_len, max_array_len=header_len, max_map_len=header_len,
            max_bin_len=0, max_ext_len=0)
    except (ValueError, msgpack.UnpackException) as e:
        raise WireError(f"header: not valid msgpack ({type(e).__name__}: {e})") from e
    _keys("header", header, ("kind", "meta", "arrays"))
    if not isinstance(header["kind"], str):
        _fail("header.kind", f"expected str, got {type(header['kind']).__name__}")
    for part in ("meta", "arrays"):
        if not isinstance(header[part], dict):
            _fail(f"header.{part}", f"expected a map, got {type(header[part]).__name__}")
    return header, _align(_PREFIX.size + header_len)


# ---------------------------------------------------------------- public entry points

def _framed(msg, max_bytes: int) -> tuple:
    cls = type(msg)
    if _KINDS.get(cls.__name__) is not cls:
        _fail("encode", f"{cls.__name__} is not a wire message (one of {sorted(_KINDS)})")
    try:
        meta, arrays, wire_dtypes = msg._to_wire()
        cls._check_wire(meta, arrays, wire_dtypes)
        return _frame(cls.__name__, meta, arrays, wire_dtypes, max_bytes)
    except WireError:
        raise
    except _MALFORMED as e:
        raise WireError(f"{cls.__name__}: cannot encode: {type(e).__name__}: {e}") from e


def encode(msg, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """msg as one wire message; raises WireError if it breaks its schema or exceeds max_bytes."""
    return _join(*_framed(msg, max_bytes))


def encode_array(msg, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """The same bytes as `encode`, in a 1-D uint8 array: what to `ray.put` (consumers then read it
    from shared memory without a copy). Past 32 MiB it is also ~4x faster to build than bytes:
    glibc maps fresh 4 KiB pages for every large bytes object, numpy asks for huge pages."""
    return _fill(*_framed(msg, max_bytes))


def encode_parts(msg, max_bytes: int = DEFAULT_MAX_BYTES) -> list[np.ndarray]:
    """The same message without joining it: the head (prefix, header, padding) as a uint8 array,
    then the arrays' bytes as uint8 views of them, no copy. `ray.put(parts)` writes them straight
    into shared memory, so the put is the message's one copy (`encode_array` + put make two);
    `decode(parts)` reads them back. For weights, where that copy is the model.

    Arrays that are views of one buffer, back to back in it as they are in the message (the
    parameters in DeepSpeed's flat ZeRO buffer, `named_tensors_to_wire`), go as one part: Ray
    copies each large part with a pool of threads it starts for that part."""
    head, framed, _ = _framed(msg, max_bytes)
    parts, end = [np.frombuffer(head, np.uint8)], -1
    for start, data in framed:
        run = _joined(parts[-1], data) if start == end and len(parts) > 1 else None
        if run is None:
            parts.append(data)
        else:
            parts[-1] = run
        end = start + data.nbytes
    return parts


def _joined(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """One uint8 view of a's bytes then b's, when both view one buffer and b starts where a ends."""
    owner = a.base
    if not (a.nbytes and b.nbytes and isinstance(owner, np.ndarray) and owner is b.base
            and owner.flags.c_contiguous and a.ctypes.data + a.nbytes == b.ctypes.data):
        return None
    whole = owner.reshape(-1).view(np.uint8)
    start = a.ctypes.data - whole.ctypes.data
    if start < 0 or start + a.nbytes + b.nbytes > whole.nbytes:
        return None
    return whole[start:start + a.nbytes + b.nbytes]


def decode(buf, max_bytes: int = DEFAULT_MAX_BYTES, expect: type | tuple[type, ...] | None = None):
    """A message from bytes / bytearray / memoryview / 1-D uint8 array (or the list of parts
    `encode_parts` makes), arrays zero-copy and read-only. Raises WireError, and nothing else, on
    any malformed input or when the message is not of the `expect`ed class(es)."""
    try:
        kind, meta, arrays, wire_dtypes = _unpack(buf, max_bytes)
        cls = _KINDS.get(kind)
        if cls is None:
            _fail("header.kind", f"unknown kind {kind!r:.40} (known: {sorted(_KINDS)})")
        expected = expect if isinstance(expect, tuple) else (expect,)
        if expect is not None and cls not in expected:
            _fail("header.kind", f"expected {'/'.join(c.__name__ for c in expected)}, got {kind}")
        cls._check_wire(meta, arrays, wire_dtypes)
        return cls._from_wire(meta, arrays, wire_dtypes)
    except WireError:
        raise
    except _MALFORMED as e:
        raise WireError(f"malformed message: {type(e).__name__}: {e}") from e
