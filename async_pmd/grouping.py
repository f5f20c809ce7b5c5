"""The GroupBuffer's pure logic: hold complete scored groups, account for every uid, build TrainBatches.

    ScoredBatch (scorer) --put--> GroupStore --take--> TrainBatch (learner)

A group is the n responses to one prompt (`uid`). `put` classifies each arriving group exactly once
(duplicate / malformed / failed / filtered / held); `take` drops held groups that grew too stale,
then pops the oldest ones and turns them into one padded TrainBatch with advantages and partition
weights from `async_pmd.algos`. The reward band (lb, ub) is applied once, where
`algorithm.band_filter` says: `weight` (the seed's) holds every group and gives the out-of-band
ones weight 0 at `take`, so they stay inside the loss's batch mean; `drop` filters them at `put`
and the batch is refilled with in-band groups. No Ray here: `services/buffer.py` wraps this in an
actor, waits and retries when `put` raises BufferFull (backpressure), and forwards
`drain_resolved()` to the driver's ledger.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from itertools import islice
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from async_pmd.algos import compute_wpmd_weight, get_adv_estimator_fn, group_band_mask
from async_pmd.wire import ScoredBatch, ScoredGroup, TrainBatch

if TYPE_CHECKING:
    from async_pmd.config import AlgorithmConfig

OUTCOMES = ("trained", "filtered", "stale", "failed", "duplicate", "malformed")
_PUT_OUTCOMES = ("duplicate", "malformed", "failed", "filtered")  # what `put` decides (besides `held`)
STATE_VERSION = 2  # 2: pending_resolved holds [uid, outcome, step]


class BufferFull(RuntimeError):
    """`put` would hold more groups than there is room for; nothing was changed."""


def _pad(flat: np.ndarray, lengths: np.ndarray, width: int, *, left: bool, fill, dtype) -> np.ndarray:
    """Ragged rows (flat values [Σ lengths], lengths [N]) -> [N, width], by one flat-index scatter."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(len(flat)) - starts[rows]
    if left:
        cols += (width - lengths)[rows]
    out = np.full((len(lengths), width), fill, dtype)
    out[rows, cols] = flat
    return out


def segment_metrics(groups: list[ScoredGroup]) -> dict[str, float]:
    """Partial rollouts: segments per response, and the share of response tokens sampled under a
    version older than their response's last segment (1 segment each, and 0, without them).

    A few numpy calls per group, none per response: a group sampled in one piece (no segments,
    every group without partial rollouts) is n segments and no old tokens."""
    responses = segments = old = total = 0
    for g in groups:
        responses += g.n
        if g.segment_lengths is None or g.segment_versions is None:
            segments += g.n
            total += sum(map(len, g.response_ids))
            continue
        counts = np.fromiter(map(len, g.segment_lengths), np.int64, g.n)
        lengths, versions = np.concatenate(g.segment_lengths), np.concatenate(g.segment_versions)
        last = np.repeat(versions[np.cumsum(counts) - 1], counts)  # each segment's response's last version
        old += int(lengths[versions < last].sum())
        total += int(lengths.sum())
        segments += int(counts.sum())
    return {"partial/segments_per_response": segments / max(responses, 1),
            "partial/old_version_token_share": old / max(total, 1)}


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> float:
    return float((x * mask).sum() / max(mask.sum(), 1.0))


class GroupStore:
    """Held complete groups in arrival order (FIFO) and the accounting of every uid.

    Invariants: a uid is classified once (a second arrival counts `duplicate` and is dropped);
    `len(held) <= capacity_groups`; every arrival is exactly one of held / trained / filtered /
    stale / failed / duplicate / malformed, so Σ counters (held included) == arrivals.
    Held groups carry their effective rewards: 0 for a failed response under on_failure="zero"
    and for a zero-length response (no token to credit), so the band filter (at `put` or `take`)
    and the advantages at `take` see the same scores. Under band_filter="weight" nothing is
    `filtered`: out-of-band groups are trained with weight 0 (counted in `groups/band_zero_weight`).
    """

    def __init__(self, *, group_size: int, algorithm: AlgorithmConfig, max_staleness: int,
                 capacity_groups: int, on_failure: Literal["zero", "drop_group"], pad_token_id: int):
        if group_size < 1 or capacity_groups < 1 or max_staleness < 0 or pad_token_id < 0:
            raise ValueError("need group_size >= 1, capacity_groups >= 1, max_staleness >= 0, "
                             "pad_token_id >= 0")
        if on_failure not in ("zero", "drop_group"):
            raise ValueError(f"on_failure must be 'zero' or 'drop_group', got {on_failure!r}")
        self.group_size, self.algorithm, self.max_staleness = group_size, algorithm, max_staleness
        self.capacity_groups, self.on_failure, self.pad_token_id = capacity_groups, on_failure, pad_token_id
        self._estimator = get_adv_estimator_fn(algorithm.adv_estimator)  # fail at build, not at step 1
        self._held: OrderedDict[str, ScoredGroup] = OrderedDict()
        self._seen: set[str] = set()  # every uid ever classified, held ones included
        self._resolved: list[tuple[str, str, int]] = []  # (uid, outcome, step) not yet drained by the driver
        # (learner step, groups) of batches taken but not known trained yet (the next step's take,
        # or `confirm`, tells): a stop between take and train must not count them trained.
        self._in_training: list[tuple[int, list[ScoredGroup]]] = []
        self._counts = dict.fromkeys(OUTCOMES, 0)

    # ------------------------------------------------------------------ protocol

    def room(self) -> int:
        """Groups `put` may still hold."""
        return self.capacity_groups - len(self._held)

    def put(self, batch: ScoredBatch) -> dict[str, int]:
        """Classify and hold the batch's groups; returns this call's counts by outcome (and `held`).

        All or nothing: raises BufferFull, changing nothing, if the groups to hold exceed `room()`.
        """
        outcome, candidates, uids = {}, [], set()
        for g in batch.groups:
            if g.uid in self._seen or g.uid in uids:
                outcome.setdefault("duplicate", []).append(g)
                continue  # a re-issued request that completed twice: first arrival wins
            uids.add(g.uid)
            if g.n != self.group_size:
                outcome.setdefault("malformed", []).append(g)
            elif (rewards := self._effective_rewards(g)) is None:
                outcome.setdefault("failed", []).append(g)
            else:
                candidates.append((g, rewards))
        keep = self._band_at_put(candidates)
        outcome["filtered"] = [g for (g, _), k in zip(candidates, keep) if not k]
        to_hold = [dataclasses.replace(g, rewards=r) for (g, r), k in zip(candidates, keep) if k]
        if len(to_hold) > self.room():
            raise BufferFull(f"{len(to_hold)} groups to hold, room for {self.room()} "
                             f"(capacity {self.capacity_groups})")

        # Commit: nothing above touched state.
        self._seen |= uids
        for name in ("malformed", "failed", "filtered"):  # duplicates were resolved at first arrival
            self._resolve(name, [g.uid for g in outcome.get(name, ())])
        self._counts["duplicate"] += len(outcome.get("duplicate", ()))
        self._held.update((g.uid, g) for g in to_hold)
        counts = {name: len(outcome.get(name, ())) for name in _PUT_OUTCOMES}
        return {**counts, "held": len(to_hold)}

    def take(self, num_groups: int, learner_step: int) -> tuple[TrainBatch | None, dict]:
        """Drop stale groups, then pop the oldest `num_groups` as a TrainBatch of B = num_groups·n rows
        (in uid order). They count as trained once `learner_step` is confirmed done (`confirm`, or
        a take for a later step); until then they are held, and a checkpoint saves them as pending.

        Returns (None, {}) while fewer than `num_groups` fresh groups are held.
        """
        if not 1 <= num_groups <= self.capacity_groups:
            raise ValueError(f"num_groups must be in [1, capacity_groups={self.capacity_groups}], "
                             f"got {num_groups}")
        self.confirm(learner_step)  # the loop takes step k only after step k - 1 was trained
        stale = [u for u, g in self._held.items() if learner_step - g.policy_version > self.max_staleness]
        for uid in stale:
            del self._held[uid]
        self._resolve("stale", stale)
        if len(self._held) < num_groups:
            return None, {}
        # The oldest groups, in uid order: the rows of a batch do not depend on which request of
        # the same step happened to arrive first (same seed, same batch, bit for bit).
        groups = sorted(islice(self._held.values(), num_groups), key=lambda g: g.uid)
        batch, metrics = self._build(groups, learner_step)  # before popping: a raise loses nothing
        for g in groups:
            del self._held[g.uid]
        self._in_training.append((learner_step, groups))
        metrics["groups/stale_dropped"] = float(len(stale))
        metrics["groups/held_after"] = float(len(self._held))
        return batch, metrics

    def confirm(self, trained_steps: int) -> None:
        """Learner steps 0 .. trained_steps - 1 are done: the batches taken for them are trained."""
        for learner_step, groups in [b for b in self._in_training if b[0] < trained_steps]:
            self._resolve("trained", [g.uid for g in groups], step=learner_step + 1)
        self._in_training = [b for b in self._in_training if b[0] >= trained_steps]

    def drain_resolved(self) -> list[tuple[str, str, int]]:
        """(uid, outcome, step) resolved for good since the last call: outcome is trained (at `step`,
        the metrics step), filtered, stale, failed or malformed (`step` 0)."""
        out, self._resolved = self._resolved, []
        return out

    def held_uids(self) -> list[str]:
        """Held uids, oldest first."""
        return list(self._held)

    @property
    def counters(self) -> dict[str, int]:
        """Groups by outcome since the start (or the loaded state), plus `held` now (a batch taken
        but not confirmed trained counts as held)."""
        return {**self._counts, "held": len(self._held) + sum(len(g) for _, g in self._in_training)}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """JSON-native counters and resolved uids. Held groups, and a batch taken but not confirmed
        trained, are not saved: their uids stay unseen, so the driver's re-issue of them after a
        resume is accepted, not a duplicate."""
        unsaved = self._held.keys() | {g.uid for _, groups in self._in_training for g in groups}
        return {"version": STATE_VERSION, "counters": dict(self._counts),
                "seen": sorted(self._seen - unsaved), "pending_resolved": [list(r) for r in self._resolved]}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output into a store that holds nothing; ValueError on a bad state."""
        if self._held:
            raise ValueError("load_state_dict needs an empty store (it holds groups)")
        if not isinstance(state, dict) or set(state) != {"version", "counters", "seen", "pending_resolved"}:
            raise ValueError("GroupStore state: expected keys version, counters, seen, pending_resolved")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"GroupStore state: version {state['version']!r}, "
                             f"this code reads {STATE_VERSION}")
        counters = state["counters"]
        if not isinstance(counters, dict) or set(counters) != set(OUTCOMES) or \
                not all(type(v) is int and v >= 0 for v in counters.values()):
            raise ValueError(f"GroupStore state: counters must map exactly {OUTCOMES} to ints >= 0")
        if not isinstance(state["seen"], list) or not all(isinstance(u, str) for u in state["seen"]):
            raise ValueError("GroupStore state: seen must be a list of str uids")
        resolved = state["pending_resolved"]
        if not isinstance(resolved, list) or not all(
                isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and r[1] in OUTCOMES
                and type(r[2]) is int for r in resolved):
            raise ValueError("GroupStore state: pending_resolved must be a list of [uid, outcome, step]")
        if not {r[0] for r in resolved} <= set(state["seen"]):
            raise ValueError("GroupStore state: pending_resolved has uids not in seen")
        self._counts, self._seen = dict(counters), set(state["seen"])
        self._resolved = [tuple(r) for r in resolved]

    # ------------------------------------------------------------------ helpers

    def _resolve(self, outcome: str, uids: list[str], step: int = 0) -> None:
        self._counts[outcome] += len(uids)
        self._resolved += [(u, outcome, step) for u in uids]

    def _effective_rewards(self, g: ScoredGroup) -> np.ndarray | None:
        """float32[n] rewards to train on, or None if the group fails under the failure policy."""
        failed = np.array([s != "ok" for s in g.reward_status], bool)
        if failed.any() and self.on_failure == "drop_group":
            return None
        rewards = np.where(failed, np.float32(0), np.asarray(g.rewards, np.float32))
        if not np.isfinite(rewards).all():
            return None  # a NaN on an "ok" response: the scorer broke its contract
        return np.where(g.response_lengths > 0, rewards, np.float32(0))

    def _band_at_put(self, candidates: list[tuple[ScoredGroup, np.ndarray]]) -> np.ndarray:
        """bool [len(candidates)]: the groups `put` holds (all of them unless band_filter="drop")."""
        if self.algorithm.band_filter != "drop" or not candidates:
            return np.ones(len(candidates), bool)
        return self._band(np.stack([r for _, r in candidates]))

    def _band(self, rewards: np.ndarray) -> np.ndarray:
        """rewards [G, n] -> bool [G]: group mean in the open interval (lb, ub), one vectorised call."""
        lb, ub = self.algorithm.partition_reward_lb, self.algorithm.partition_reward_ub
        if lb is None and ub is None:
            return np.ones(len(rewards), bool)
        index = np.repeat(np.arange(len(rewards)), rewards.shape[1])
        rows = group_band_mask(torch.from_numpy(rewards.reshape(-1)), index, lb, ub).numpy()
        return rows.reshape(rewards.shape)[:, 0]

    def _build(self, groups: list[ScoredGroup], learner_step: int) -> tuple[TrainBatch, dict]:
        """G groups -> a TrainBatch of B = G·n rows (group-major) and its metrics."""
        n = self.group_size
        uids = [g.uid for g in groups for _ in range(n)]
        layout = self._layout(groups)
        rewards, r_len, mask_np = layout.pop("rewards"), layout.pop("lengths"), layout["response_mask"]

        # Each response's reward on its last token (zero-length rows already carry reward 0).
        token_rewards = np.zeros(mask_np.shape, np.float32)
        has = np.flatnonzero(r_len > 0)
        token_rewards[has, r_len[has] - 1] = rewards[has]
        # Rows are group-major and uids unique here, so integer ids name the same groups without
        # the string factorisation that dominates the estimators at large B (ops/bench/bench_algos.py).
        index = np.repeat(np.arange(len(groups)), n)
        tlr, mask = torch.from_numpy(token_rewards), torch.from_numpy(mask_np)
        advantages, _ = self._estimator(tlr, mask, index, self.algorithm)
        weights, in_band = self._partition_weights(tlr, mask, index, rewards.reshape(len(groups), n))

        versions = np.repeat(np.array([g.policy_version for g in groups], np.int64), n)
        batch = TrainBatch(**layout, advantages=advantages.float().numpy(),
                           partition_weights=weights.float().numpy(), rewards=rewards,
                           policy_versions=versions, uids=uids, learner_step=int(learner_step))
        finish = [f for g in groups for f in g.finish_reasons]
        metrics = self._metrics(batch, r_len, learner_step - versions, finish)
        metrics.update(segment_metrics(groups))
        metrics["groups/band_zero_weight"] = float((~in_band).sum())
        # Groups whose n rewards are all equal carry no advantage under any estimator: the share
        # of the batch that cannot move the policy (a collapsed or solved policy drives it to 1).
        grouped = rewards.reshape(len(groups), n)
        metrics["groups/zero_signal"] = float((grouped.max(axis=1) == grouped.min(axis=1)).mean())
        return batch, metrics

    def _partition_weights(self, tlr, mask, index, rewards: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """(weights [B,T], in_band bool [G]) for group-major rows; rewards [G, n].

        The band was applied at `put` under "drop" (every group here is in band); under "weight"
        it is applied here, once, as weight 0 on the out-of-band groups' rows.
        """
        weights = compute_wpmd_weight(tlr, mask, index, self.algorithm, use_is=self.algorithm.use_is,
                                      apply_band=False)
        if self.algorithm.band_filter != "weight":
            return weights, np.ones(len(rewards), bool)
        in_band = self._band(rewards)
        row_keep = torch.from_numpy(np.repeat(in_band, rewards.shape[1])).to(weights.dtype).unsqueeze(-1)
        return weights * row_keep, in_band

    def _layout(self, groups: list[ScoredGroup]) -> dict[str, np.ndarray]:
        """Padded token arrays of the groups' B rows, plus flat `rewards` [B] and `lengths` [B]."""
        row_group = np.repeat(np.arange(len(groups)), self.group_size)  # [B] row -> group

        # Prompts: left-padded once per group, then repeated n times.  [G, P] -> [B, P]
        p_len = np.array([len(g.prompt_ids) for g in groups], np.int64)
        p_flat = np.concatenate([g.prompt_ids for g in groups])
        pad_p = dict(lengths=p_len, width=max(int(p_len.max()), 1), left=True)
        prompts = _pad(p_flat, **pad_p, fill=self.pad_token_id, dtype=np.int32)[row_group]
        prompt_mask = _pad(np.ones(len(p_flat), np.int8), **pad_p, fill=0, dtype=np.int8)[row_group]

        # Responses: right-padded.  [B, R]; R >= 1 so the learner never sees a zero-width batch.
        r_ids = [r for g in groups for r in g.response_ids]
        r_len = np.array([len(r) for r in r_ids], np.int64)
        pad_r = dict(lengths=r_len, width=max(int(r_len.max()), 1), left=False)
        lp_flat = np.concatenate([lp for g in groups for lp in g.logprobs])
        response_mask = _pad(np.ones(int(r_len.sum()), np.float32), **pad_r, fill=0.0, dtype=np.float32)
        return {
            "prompts": prompts,
            "responses": _pad(np.concatenate(r_ids), **pad_r, fill=self.pad_token_id, dtype=np.int32),
            "response_mask": response_mask,
            "attention_mask": np.concatenate([prompt_mask, response_mask.astype(np.int8)], axis=1),
            "old_log_probs": _pad(lp_flat, **pad_r, fill=0.0, dtype=np.float32),
            "rewards": np.concatenate([g.rewards for g in groups]).astype(np.float32),
            "lengths": r_len,
        }

    @staticmethod
    def _metrics(batch: TrainBatch, r_len: np.ndarray, staleness: np.ndarray, finish: list[str]) -> dict:
        rewards, mask = batch.rewards, batch.response_mask
        return {
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "reward/max": float(rewards.max()), "reward/min": float(rewards.min()),
            "staleness/mean": float(staleness.mean()), "staleness/max": float(staleness.max()),
            "response_length/mean": float(r_len.mean()),
            "response_length/clip_ratio": sum(f == "length" for f in finish) / len(finish),
            "adv/mean": _masked_mean(batch.advantages, mask),
            "adv/abs_mean": _masked_mean(np.abs(batch.advantages), mask),
            "partition_weight/mean": _masked_mean(batch.partition_weights, mask),
        }
