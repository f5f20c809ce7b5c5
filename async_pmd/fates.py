"""The per-prompt fate record: for every prompt the data cursor has passed, what became of it.

Each prompt the RolloutDriver draws gets the next dispatch ordinal `d` (its uid ends in `-d<d>`),
and exactly one fate: trained at step s (the metrics.jsonl step, >= 1), filtered (the band),
stale, failed, or pending (in flight or buffered: then in the checkpoint's pending list). The
record is one int32 per prompt (4 MB per million prompts), kept by the driver, which owns the
ordinals, and saved inside each checkpoint's trainer state, so it is written atomically with
it and rolled back with it on resume. Settling a prompt that already has a fate is a violation
(counted, the first ones kept): a group trained twice, or trained after it failed.

`audit(state, records)` checks a checkpoint against these rules; `python -m async_pmd.audit`
runs it on a run directory.
"""

from __future__ import annotations

import base64
import zlib
from collections import Counter

import numpy as np

PENDING, FILTERED, STALE, FAILED = -1, -2, -3, -4
NAMES = {PENDING: "pending", FILTERED: "filtered", STALE: "stale", FAILED: "failed"}
CODES = {"filtered": FILTERED, "stale": STALE, "failed": FAILED, "malformed": FAILED}
_KEEP_VIOLATIONS = 20


def ordinal(uid: str) -> int:
    """The dispatch ordinal in a uid `e<epoch>-i<index>-d<ordinal>`; ValueError for any other uid."""
    head, sep, tail = uid.rpartition("-d")
    if not sep or not tail.isdigit():
        raise ValueError(f"uid {uid!r} carries no dispatch ordinal (-d<n>)")
    return int(tail)


class FateRecord:
    """One int32 per dispatched prompt: PENDING, FILTERED, STALE, FAILED, or the step it trained at."""

    def __init__(self):
        self._codes = np.zeros(0, np.int32)
        self._n = 0
        self.violations = 0
        self.first_violations: list[str] = []

    def __len__(self) -> int:
        return self._n

    def dispatch(self, count: int) -> None:
        """`count` more prompts drawn (ordinals len(self) .. len(self) + count - 1), all pending."""
        need = self._n + count
        if need > len(self._codes):
            grown = np.full(max(need, 2 * len(self._codes), 1024), PENDING, np.int32)
            grown[:self._n] = self._codes[:self._n]
            self._codes = grown
        self._codes[self._n:need] = PENDING
        self._n = need

    def settle(self, uid: str, outcome: str, step: int = 0) -> None:
        """`outcome` is trained (at `step` >= 1), filtered, stale, failed or malformed."""
        d = ordinal(uid)
        code = step if outcome == "trained" else CODES[outcome]
        if outcome == "trained" and step < 1:
            raise ValueError(f"{uid}: trained needs a step >= 1, got {step}")
        if not 0 <= d < self._n:
            self._violate(f"{uid}: settled as {outcome} but never dispatched ({self._n} dispatched)")
        elif self._codes[d] != PENDING:
            self._violate(f"{uid}: settled as {outcome} (step {step}) but already {describe(int(self._codes[d]))}")
        else:
            self._codes[d] = code

    def codes(self) -> np.ndarray:
        return self._codes[:self._n]

    def state_dict(self) -> dict:
        """JSON-native: the codes as base64 of zlib-compressed little-endian int32."""
        raw = self.codes().astype("<i4").tobytes()
        return {"n": self._n, "codes": base64.b64encode(zlib.compress(raw, 6)).decode("ascii"),
                "violations": self.violations, "first_violations": list(self.first_violations)}

    def load_state_dict(self, state: dict) -> None:
        codes = decode_codes(state)
        self._codes, self._n = codes.copy(), len(codes)
        self.violations = int(state["violations"])
        self.first_violations = [str(v) for v in state["first_violations"]]

    def _violate(self, message: str) -> None:
        self.violations += 1
        if len(self.first_violations) < _KEEP_VIOLATIONS:
            self.first_violations.append(message)


def decode_codes(state: dict) -> np.ndarray:
    codes = np.frombuffer(zlib.decompress(base64.b64decode(state["codes"])), "<i4").astype(np.int32)
    if len(codes) != int(state["n"]):
        raise ValueError(f"fate record: {len(codes)} codes for n={state['n']}")
    return codes


def describe(code: int) -> str:
    return f"trained at step {code}" if code > 0 else NAMES.get(code, f"code {code}")


def audit(trainer_state: dict, records: list[dict], batch_groups: int) -> tuple[dict, list[str]]:
    """(counts by fate, violations) of a checkpoint's trainer state and the run's metrics records.

    Rules: one fate per prompt the cursor passed; the pending prompts are exactly the
    checkpoint's pending list (any other is lost, any extra would be trained twice); every step
    1..S trained exactly `batch_groups` prompts and none trained after S; no prompt was settled
    twice; metrics.jsonl holds each learner step 1..S once (and nothing past S).
    """
    driver = trainer_state["driver"]
    step, fates = int(trainer_state["step"]), driver["fates"]
    codes = decode_codes(fates)
    problems = list(fates["first_violations"])
    if fates["violations"] > len(problems):
        problems.append(f"... {fates['violations'] - len(problems)} more settled twice")
    source = driver["source"]
    drawn = source["epoch"] * source["num_prompts"] + source["position"]
    if len(codes) != drawn or len(codes) != driver["ledger"]["dispatched"]:
        problems.append(f"{len(codes)} fates, but the cursor passed {drawn} prompts and the ledger dispatched "
                        f"{driver['ledger']['dispatched']}")
    pending = {ordinal(p["uid"]) for p in driver["ledger"]["pending"]}
    marked = set(np.flatnonzero(codes == PENDING).tolist())
    problems += [f"prompt d{d} is pending but not in the checkpoint's pending list: lost" for d in sorted(marked - pending)[:10]]
    problems += [f"prompt d{d} is in the pending list but {describe(int(codes[d]))}: it would be trained twice"
                 for d in sorted(pending - marked)[:10] if d < len(codes)]
    per_step = Counter(int(c) for c in codes if c > 0)
    for s in range(1, step + 1):
        if per_step.get(s, 0) != batch_groups:
            problems.append(f"step {s} trained {per_step.get(s, 0)} prompts, not {batch_groups}")
    problems += [f"{n} prompts trained at step {s}, after the checkpoint's step {step}"
                 for s, n in sorted(per_step.items()) if s > step]
    steps = Counter(r["step"] for r in records if "timing/step_s" in r)
    problems += [f"metrics.jsonl has step {s} {n} times" for s, n in sorted(steps.items()) if n != 1]
    missing = sorted(set(range(1, step + 1)) - set(steps))
    if missing:
        problems.append(f"metrics.jsonl misses steps {missing[:10]}")
    counts = Counter(describe(int(c)) if c < 0 else "trained" for c in codes)
    return {"prompts": len(codes), **{k: counts.get(k, 0) for k in ("trained", "filtered", "stale", "failed",
                                                                   "pending")}, "step": step}, problems
