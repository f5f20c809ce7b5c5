"""Partial rollouts (Kimi K1.5): the RolloutDriver's pool of groups whose responses are still growing.

    fresh group --open--> PartialPool --next_rows--> rows-mode GenerationRequest (generator)
    SegmentBatch (generator) --add--> PartialPool --complete groups--> RolloutBatch (scorer)

A response is generated `segment_tokens` at most per request; one that has not stopped (EOS or a
stop token) and is shorter than `response_length` goes back to the pool with its tokens, the
log-probs they were sampled with, and the weight version of each segment, and a later request
continues it from prompt + tokens so far, on whichever replica and weights serve it then. A group
leaves the pool when all `n` of its responses have finished; its `policy_version` is its oldest
segment's, which the buffer's staleness bound and metrics use.

Why π_old stays right: each token keeps the log-prob it was sampled with, so a response of mixed
versions is still scored against the policy that actually produced every token (the behaviour
policy reading of the OPMD loss).

Restarts: before a group's rows go out again, every response whose first segment is more than
`max_segment_staleness` versions older than the published weights is reset to the prompt (with a
new sampling key): finished or not, its group would otherwise be trained at a staleness the
buffer drops. Each response has a sampling key of its own, from the run seed, its uid, its index
and its restarts, so the engine can continue it exactly where it stopped (the torch engine keys
every draw by (key, position)), and a re-issued request samples the same segment again.

No Ray here; the driver wraps it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from async_pmd import wire
from async_pmd.data import Prompt
from async_pmd.ledger import pending_entry

STATE_VERSION = 1


@dataclass
class Response:
    """One response of a group: the tokens so far and the segments they were sampled in."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    segment_lengths: list[int] = field(default_factory=list)
    segment_versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """None while unfinished; then "stop" or "length"."""
    restarts: int = 0

    def reset(self) -> None:
        self.tokens, self.logprobs, self.segment_lengths, self.segment_versions = [], [], [], []
        self.finish_reason = None
        self.restarts += 1


@dataclass
class PartialGroup:
    uid: str
    prompt: Prompt
    responses: list[Response]

    @property
    def complete(self) -> bool:
        return all(r.finish_reason is not None for r in self.responses)


@dataclass(frozen=True)
class Row:
    """One response row of a rows-mode request."""

    uid: str
    index: int
    prompt: Prompt
    prefix: tuple[int, ...]
    seed: int


def row_seed(seed: int, uid: str, index: int, restarts: int) -> int:
    """A response's sampling key in [0, 2**63): fixed across its segments, new after a restart."""
    key = f"{seed}|{uid}|{index}|{restarts}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class PartialPool:
    """Open groups by uid (dispatch order), the queue of response rows waiting for a request, and
    the counters behind the `partial/*` metrics.

    Invariants: every unfinished response of an open group is either queued or out in exactly
    one request (whose answer, through `add`, queues it again unless it finished); a group is in
    the pool from `open` until it is complete (returned by `add`) or failed.
    """

    def __init__(self, *, n: int, response_length: int, max_segment_staleness: int, seed: int):
        self.n, self.response_length, self.cap, self.seed = n, response_length, max_segment_staleness, seed
        self._groups: OrderedDict[str, PartialGroup] = OrderedDict()
        self._queue: deque[tuple[str, int]] = deque()  # (uid, response index) waiting for a request
        self._out: set[tuple[str, int]] = set()  # rows in a request now: their answer is expected
        self.stats = {"restarts": 0, "segments": 0, "continued_segments": 0, "completed_groups": 0}

    def __len__(self) -> int:
        return len(self._groups)

    @property
    def queued_rows(self) -> int:
        return len(self._queue)

    def uids(self) -> list[str]:
        return list(self._groups)

    def open(self, uid: str, prompt: Prompt) -> None:
        """A new group: n empty responses, all queued."""
        if uid in self._groups:
            raise ValueError(f"group {uid} is already open")
        self._groups[uid] = PartialGroup(uid, prompt, [Response() for _ in range(self.n)])
        self._queue.extend((uid, j) for j in range(self.n))

    def next_rows(self, max_rows: int, published_version: int) -> list[Row]:
        """Up to `max_rows` queued rows, oldest group first, after restarting too-old responses."""
        rows: list[Row] = []
        while self._queue and len(rows) < max_rows:
            uid, j = self._queue.popleft()
            group = self._groups.get(uid)
            if group is None or group.responses[j].finish_reason is not None:
                continue  # failed meanwhile, or already queued again by a restart below
            self._restart_old(group, published_version)
            r = group.responses[j]
            self._out.add((uid, j))
            rows.append(Row(uid, j, group.prompt, tuple(r.tokens), row_seed(self.seed, uid, j, r.restarts)))
        return rows

    def add(self, batch: wire.SegmentBatch) -> list[PartialGroup]:
        """Append each row's new segment; returns the groups this completed (now out of the pool)."""
        done = []
        for uid, j, ids, lps, reason, version in zip(batch.uids, batch.response_indices, batch.response_ids,
                                                     batch.logprobs, batch.finish_reasons, batch.policy_versions):
            group = self._groups.get(uid)
            if group is None or (uid, j) not in self._out:
                continue  # a late duplicate of a row already answered, or a group failed meanwhile
            self._out.discard((uid, j))
            r = group.responses[j]
            room = self.response_length - len(r.tokens)
            ids, lps = ids[:room].tolist(), lps[:room].tolist()
            if ids:  # an aborted row may come back empty: nothing to record, ask again
                self.stats["segments"] += 1
                self.stats["continued_segments"] += bool(r.tokens)
                r.tokens += ids
                r.logprobs += lps
                r.segment_lengths.append(len(ids))
                r.segment_versions.append(int(version))
            if reason == "stop" and ids:
                r.finish_reason = "stop"
            elif len(r.tokens) >= self.response_length:
                r.finish_reason = "length"
            else:
                self._queue.append((uid, j))  # unfinished (or aborted): continued by a later request
            if group.complete:
                done.append(self._groups.pop(uid))
        self.stats["completed_groups"] += len(done)
        return done

    def fail(self, uids: list[str]) -> None:
        for uid in uids:
            if self._groups.pop(uid, None) is not None:
                self._out -= {(uid, j) for j in range(self.n)}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """JSON-native: every open group with its responses so far (tokens, log-probs, segments);
        a resumed pool queues every unfinished response again (those in flight died with the run)."""
        return {"version": STATE_VERSION, "groups": [
            {**pending_entry(g.uid, g.prompt),
             "responses": [{"tokens": r.tokens, "logprobs": r.logprobs, "segment_lengths": r.segment_lengths,
                            "segment_versions": r.segment_versions, "finish_reason": r.finish_reason,
                            "restarts": r.restarts} for r in g.responses]}
            for g in self._groups.values()]}

    def load_state_dict(self, state: dict, prompts: dict[str, Prompt]) -> list[str]:
        """Restore the saved groups whose uid is in `prompts` (the ledger's pending ones); returns
        their uids. ValueError on a malformed state."""
        try:
            if state["version"] != STATE_VERSION:
                raise ValueError(f"version {state['version']!r}, this code reads {STATE_VERSION}")
            restored = []
            for g in state["groups"]:
                uid = str(g["uid"])
                if uid not in prompts:
                    continue
                responses = [Response([int(t) for t in r["tokens"]], [float(x) for x in r["logprobs"]],
                                      [int(x) for x in r["segment_lengths"]], [int(x) for x in r["segment_versions"]],
                                      r["finish_reason"], int(r["restarts"])) for r in g["responses"]]
                if len(responses) != self.n or any(
                        len(r.tokens) != len(r.logprobs) or sum(r.segment_lengths) != len(r.tokens)
                        or len(r.segment_lengths) != len(r.segment_versions) for r in responses):
                    raise ValueError(f"group {uid}: responses disagree with their segments or n={self.n}")
                self._groups[uid] = PartialGroup(uid, prompts[uid], responses)
                self._queue.extend((uid, j) for j, r in enumerate(responses) if r.finish_reason is None)
                restored.append(uid)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"partial pool state is malformed: {exc!r}") from None
        return restored

    def saved_tokens(self) -> int:
        """Response tokens held by open groups (what a checkpoint saves instead of regenerating)."""
        return sum(len(r.tokens) for g in self._groups.values() for r in g.responses)

    # ------------------------------------------------------------------ helpers

    def _restart_old(self, group: PartialGroup, published_version: int) -> None:
        for j, r in enumerate(group.responses):
            if (group.uid, j) in self._out:
                continue  # in a request now: its answer extends this prefix; checked next time
            if r.segment_versions and published_version - r.segment_versions[0] > self.cap:
                queued = r.finish_reason is not None  # an unfinished one is queued or being handed out
                r.reset()
                self.stats["restarts"] += 1
                if queued:
                    self._queue.append((group.uid, j))


def to_rollout_group(group: PartialGroup, decode_texts) -> wire.RolloutGroup:
    """A complete group as the scorer takes it, segments and versions included."""
    p, responses = group.prompt, group.responses
    ids = [np.array(r.tokens, np.int32) for r in responses]
    versions = [np.array(r.segment_versions, np.int64) for r in responses]
    return wire.RolloutGroup(
        uid=group.uid, prompt_ids=np.array(p.token_ids, np.int32), response_ids=ids,
        logprobs=[np.array(r.logprobs, np.float32) for r in responses],
        finish_reasons=[r.finish_reason for r in responses],
        policy_version=int(min(v.min() for v in versions)), prompt_text=p.text,
        response_texts=decode_texts(ids), answer=p.answer, sample_index=p.index,
        extra={k: v for k, v in p.extra.items() if isinstance(v, (type(None), bool, int, float, str))},
        segment_lengths=[np.array(r.segment_lengths, np.int32) for r in responses], segment_versions=versions)


def rows_request(request_id: int, attempt: int, rows: list[Row], sampling: dict) -> wire.GenerationRequest:
    """The rows-mode wire request for `rows`."""
    return wire.GenerationRequest(
        request_id=request_id, attempt=attempt, uids=[r.uid for r in rows],
        prompt_ids=[np.array(r.prompt.token_ids, np.int32) for r in rows],
        prompt_texts=[r.prompt.text for r in rows], answers=[r.prompt.answer for r in rows],
        sample_indices=[r.prompt.index for r in rows], extras=[{} for _ in rows], sampling=dict(sampling),
        response_indices=[r.index for r in rows], prefix_ids=[np.array(r.prefix, np.int32) for r in rows],
        row_seeds=[r.seed for r in rows])
