"""PartialPool: partial rollouts' bookkeeping in the driver (no Ray).

Contract pinned here: a group leaves the pool only when all n responses have stopped or reached
response_length; an unfinished response is handed out again with its tokens so far as the
prefix and the same sampling key, so with the torch engine the segmented responses are exactly
the uninterrupted ones; a group's policy_version, and so its staleness at the buffer, is its
oldest segment's; a response whose first segment is older than the cap is restarted from the
prompt; the open groups survive a state_dict round trip through JSON.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from async_pmd import models, wire
from async_pmd.config import AlgorithmConfig
from async_pmd.data import Prompt
from async_pmd.engines import SamplingParams
from async_pmd.engines.torch_engine import TorchEngine
from async_pmd.grouping import GroupStore, segment_metrics
from async_pmd.partial import PartialPool, row_seed, rows_request, to_rollout_group

N, LENGTH = 2, 6
PROMPT = Prompt(0, "1+2=", "3", {"task": "t"}, (5, 6, 7))


def segments(rows, lengths, *, version=0, stop=()):
    """A SegmentBatch answering `rows`: row i gets lengths[i] tokens (ids 20, 21, ...), and
    finishes with 'stop' when i is in `stop`."""
    return wire.SegmentBatch(
        uids=[r.uid for r in rows], response_indices=[r.index for r in rows],
        response_ids=[np.arange(20, 20 + n, dtype=np.int32) for n in lengths],
        logprobs=[np.full(n, -0.25 * (i + 1), np.float32) for i, n in enumerate(lengths)],
        finish_reasons=["stop" if i in stop else "length" for i in range(len(rows))],
        policy_versions=[version] * len(rows))


def pool(cap=1, n=N):
    return PartialPool(n=n, response_length=LENGTH, max_segment_staleness=cap, seed=3)


def test_a_group_completes_only_when_every_response_has_finished():
    """Segments of 3 tokens: response 0 stops in its second segment, response 1 runs to
    response_length (6); the group comes out with both, in two segments each, versions kept."""
    p = pool()
    p.open("g", PROMPT)
    first = p.next_rows(10, published_version=0)
    assert [(r.index, r.prefix) for r in first] == [(0, ()), (1, ())]
    assert p.add(segments(first, [3, 3], version=0)) == []
    second = p.next_rows(10, published_version=1)
    assert [r.prefix for r in second] == [(20, 21, 22)] * 2
    assert [r.seed for r in second] == [r.seed for r in first]  # same key: the engine continues it
    done = p.add(segments(second, [2, 5], version=1, stop={0}))  # row 1 overshoots: trimmed to 6
    assert len(done) == 1 and len(p) == 0 and p.queued_rows == 0
    group = to_rollout_group(done[0], lambda ids: [str(len(x)) for x in ids])
    assert [r.tolist() for r in group.response_ids] == [[20, 21, 22, 20, 21], [20, 21, 22, 20, 21, 22]]
    assert group.finish_reasons == ["stop", "length"]
    assert [x.tolist() for x in group.segment_lengths] == [[3, 2], [3, 3]]
    assert [x.tolist() for x in group.segment_versions] == [[0, 1], [0, 1]]
    assert group.logprobs[0].tolist() == [-0.25] * 3 + [-0.25] * 2
    assert group.policy_version == 0 and group.response_texts == ["5", "6"]
    back = wire.decode(wire.encode(wire.RolloutBatch(groups=[group]))).groups[0]
    assert [x.tolist() for x in back.segment_versions] == [[0, 1], [0, 1]]
    assert p.stats["segments"] == 4 and p.stats["continued_segments"] == 2


def test_the_staleness_of_a_multi_version_group_is_its_oldest_segments():
    """Trained at step 4, a group whose segments span versions 2..4 has staleness 2 (4 - 2), not
    0: TrainBatch.policy_versions and staleness/mean use the oldest; the segment metrics count
    the tokens sampled under a version older than their response's last segment."""
    g = wire.ScoredGroup(
        uid="g", prompt_ids=np.array([1, 2], np.int32),
        response_ids=[np.arange(10, 14, dtype=np.int32), np.arange(10, 12, dtype=np.int32)],
        logprobs=[np.full(4, -0.5, np.float32), np.full(2, -0.5, np.float32)], finish_reasons=["stop"] * 2,
        policy_version=2, prompt_text="p", response_texts=["a", "b"], answer="a", sample_index=0,
        segment_lengths=[np.array([1, 3], np.int32), np.array([2], np.int32)],
        segment_versions=[np.array([2, 4], np.int64), np.array([4], np.int64)],
        rewards=np.array([1.0, 0.0], np.float32), reward_status=["ok"] * 2)
    store = GroupStore(group_size=2, algorithm=AlgorithmConfig(), max_staleness=2, capacity_groups=4,
                       on_failure="zero", pad_token_id=0)
    store.put(wire.decode(wire.encode(wire.ScoredBatch(groups=[g]))))
    batch, metrics = store.take(1, learner_step=4)
    assert batch.policy_versions.tolist() == [2, 2]
    assert metrics["staleness/mean"] == 2.0
    assert metrics["partial/segments_per_response"] == 1.5
    assert metrics["partial/old_version_token_share"] == 1 / 6  # 1 of 6 tokens at v2 < its last v4
    stale = GroupStore(group_size=2, algorithm=AlgorithmConfig(), max_staleness=1, capacity_groups=4,
                       on_failure="zero", pad_token_id=0)
    stale.put(wire.decode(wire.encode(wire.ScoredBatch(groups=[g]))))
    assert stale.take(1, learner_step=4) == (None, {})  # 4 - 2 > 1: dropped although its last segment is v4
    assert stale.counters["stale"] == 1


def test_a_response_whose_first_segment_is_too_old_restarts_from_the_prompt():
    """Cap 1: at published version 2 a response begun at version 0 is reset (prompt only, a new
    key), finished or not, and counted; one begun at version 1 is continued."""
    p = pool(cap=1)
    p.open("g", PROMPT)
    rows = p.next_rows(10, 0)
    p.add(segments(rows, [3, 2], version=0, stop={1}))  # response 1 finished at v0
    again = p.next_rows(10, 2)
    assert [(r.index, r.prefix) for r in again] == [(0, ()), (1, ())]  # the finished one queued again too
    assert p.stats["restarts"] == 2
    assert again[0].seed == row_seed(3, "g", 0, 1) != rows[0].seed
    p2 = pool(cap=1)
    p2.open("h", PROMPT)
    p2.add(segments(p2.next_rows(10, 1), [3, 3], version=1))
    assert [r.prefix for r in p2.next_rows(10, 2)] == [(20, 21, 22)] * 2 and p2.stats["restarts"] == 0


def test_late_duplicates_and_failed_groups_are_ignored():
    p = pool()
    p.open("g", PROMPT)
    rows = p.next_rows(10, 0)
    p.add(segments(rows, [3, 3]))
    p.add(segments(rows, [3, 3]))  # a re-issued request answered twice
    assert [len(r.prefix) for r in p.next_rows(10, 0)] == [3, 3]
    p.fail(["g"])
    assert p.add(segments(rows, [3, 3], stop={0, 1})) == [] and len(p) == 0


def test_open_groups_survive_a_checkpoint_through_json():
    """Tokens, log-probs, segments and restarts come back; unfinished responses (those in flight
    too) are queued again with their prefix; only the pending uids given are restored."""
    p = pool()
    p.open("g", PROMPT)
    p.open("other", PROMPT)
    p.add(segments(p.next_rows(2, 0), [3, 1], version=0, stop={1}))
    p.next_rows(10, 0)  # g's row 0 and other's rows: in flight when the checkpoint is taken
    state = json.loads(json.dumps(p.state_dict()))
    q = pool()
    assert q.load_state_dict(state, {"g": PROMPT}) == ["g"]
    assert q.saved_tokens() == 4 and q.uids() == ["g"]
    rows = q.next_rows(10, 0)
    assert [(r.index, r.prefix) for r in rows] == [(0, (20, 21, 22))]
    done = q.add(segments(rows, [3], version=1))
    group = to_rollout_group(done[0], lambda ids: [""] * len(ids))
    assert [x.tolist() for x in group.segment_versions] == [[0, 1], [0]]
    assert group.logprobs[1].tolist() == [-0.5]
    with pytest.raises(ValueError, match="disagree"):
        bad = json.loads(json.dumps(state))
        bad["groups"][0]["responses"][0]["tokens"].append(1)
        pool().load_state_dict(bad, {"g": PROMPT})


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return TorchEngine(models.build_tiny_model(tmp_path_factory.mktemp("partial") / "tiny", seed=0))


def test_pool_and_torch_engine_reproduce_uninterrupted_responses(engine):
    """The driver's loop without Ray: 3 groups of 4, 12 tokens, 5-token segments, every request
    rows of several groups in whatever order the pool gives; each finished response equals one
    uninterrupted generation of its prompt with its row key, tokens exactly, log-probs to 1e-5."""
    length, n = 12, 4
    p = PartialPool(n=n, response_length=length, max_segment_staleness=0, seed=11)
    prompts = [Prompt(i, f"{i}+{i}=", "", {}, tuple(range(3, 6 + i))) for i in range(3)]
    for i, prompt in enumerate(prompts):
        p.open(f"g{i}", prompt)
    done, requests = [], 0
    while len(p):
        rows = p.next_rows(5, published_version=0)
        request = wire.decode(wire.encode(rows_request(requests, 1, rows, {})))
        params = SamplingParams(max_new_tokens=5, row_seeds=tuple(request.row_seeds),
                                start_positions=tuple(len(x) for x in request.prefix_ids))
        outs = engine.generate([a.tolist() + b.tolist() for a, b in zip(request.prompt_ids, request.prefix_ids)],
                               params)
        done += p.add(wire.SegmentBatch(
            uids=request.uids, response_indices=request.response_indices,
            response_ids=[o[0].token_ids for o in outs], logprobs=[o[0].logprobs for o in outs],
            finish_reasons=[o[0].finish_reason for o in outs], policy_versions=[0] * len(outs)))
        requests += 1
    assert requests > 3 and p.stats["continued_segments"] > 0
    for g in done:
        for j, r in enumerate(g.responses):
            whole = engine.generate([list(g.prompt.token_ids)], SamplingParams(
                max_new_tokens=length, row_seeds=(row_seed(11, g.uid, j, 0),)))[0][0]
            assert r.tokens == whole.token_ids.tolist() and r.finish_reason == whole.finish_reason
            np.testing.assert_allclose(r.logprobs, whole.logprobs, atol=1e-5, rtol=0)


def test_segment_metrics_match_a_per_token_reference_on_random_mixed_groups():
    """`segment_metrics` (a few array calls per group) against the plain reading of its definition,
    token by token in float64: random groups, some in segments over several versions (zero-length
    segments and responses included), some in one piece (no segment arrays, as the wire decodes
    them)."""
    rng = np.random.default_rng(7)
    for trial in range(50):
        groups, ref_segments, ref_old, ref_tokens, responses = [], 0, 0.0, 0.0, 0
        for i in range(int(rng.integers(1, 6))):
            n, version = int(rng.integers(1, 5)), int(rng.integers(0, 5))
            lengths, versions = [], []
            for _ in range(n):
                s = int(rng.integers(1, 4))
                lengths.append(rng.integers(0, 4, s).astype(np.int32))
                versions.append(np.sort(version + rng.integers(0, 3, s)).astype(np.int64))
            segmented = bool(rng.integers(0, 2))
            if not segmented:  # one piece: one segment per response, at the group's version
                lengths = [np.array([int(rng.integers(0, 6))], np.int32) for _ in range(n)]
                versions = [np.array([version], np.int64) for _ in range(n)]
            for ls, vs in zip(lengths, versions):
                responses += 1
                ref_segments += len(ls)
                for length, v in zip(ls.tolist(), vs.tolist()):
                    ref_tokens += length
                    if v < vs.tolist()[-1]:
                        ref_old += length
            groups.append(wire.ScoredGroup(
                uid=f"t{trial}-g{i}", prompt_ids=np.array([1], np.int32),
                response_ids=[np.full(int(ls.sum()), 9, np.int32) for ls in lengths],
                logprobs=[np.full(int(ls.sum()), -0.5, np.float32) for ls in lengths],
                finish_reasons=["stop"] * n, policy_version=min(int(v[0]) for v in versions), prompt_text="p",
                response_texts=["r"] * n, answer="a", sample_index=0,
                segment_lengths=lengths if segmented else None, segment_versions=versions if segmented else None,
                rewards=np.zeros(n, np.float32), reward_status=["ok"] * n))
        got = segment_metrics(groups)
        assert got["partial/segments_per_response"] == pytest.approx(ref_segments / responses, rel=1e-12)
        assert got["partial/old_version_token_share"] == pytest.approx(ref_old / max(ref_tokens, 1.0), rel=1e-12)
