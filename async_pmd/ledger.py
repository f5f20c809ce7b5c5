"""The RolloutDriver's ledger: which groups are out, which request carries them, what may go next.

A group (one prompt, `n` responses, one `uid`) is *dispatched* once, when its prompt first leaves
the driver; it stays *unresolved* until the GroupBuffer reports it trained, filtered, stale or
failed, or the driver gives up on it after `max_attempts`. Re-issuing a request after a replica
died does not dispatch its groups again, and the buffer commits a uid at most once, so

    dispatched == trained + filtered + stale + failed + unfinished      (unfinished = unresolved)

holds at every instant the two sides have been read together. Unresolved prompts are what a
checkpoint saves as `pending`: a resumed run re-issues them first, so nothing is lost.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from async_pmd.data import Prompt


@dataclass
class Request:
    """One generation request: a few prompts, each becoming one group."""

    request_id: int
    uids: list[str]
    prompts: list[Prompt]
    attempt: int = 1


def may_dispatch(*, steps_taken: int, outstanding: int, new: int, published_version: int,
                 batch_groups: int, max_staleness: int, capacity_groups: int) -> bool:
    """Whether `new` more groups may go out now.

    A group sent now is generated with weights >= `published_version` and trained at about step
    `steps_taken + outstanding // batch_groups`, so its staleness is at most the difference; keep
    that within `max_staleness` (0 = synchronous: generate only with the weights being trained).
    The buffer's capacity bounds memory whatever the learner's speed.

    While fewer groups are out than one batch, the learner is waiting on these very groups, so
    the first new group decides: filtered, stale and failed groups leave gaps that a whole
    request may overshoot, and refusing it would leave the learner waiting for ever (the buffer
    drops, and counts, a group that does grow too stale). A config whose every request spans
    more learner steps than `max_staleness` allows is refused at load (`config.ClusterConfig`).
    """
    if outstanding + new > capacity_groups:
        return False
    first = outstanding if outstanding < batch_groups else outstanding + new - 1
    trained_at = steps_taken + first // batch_groups
    return trained_at - published_version <= max_staleness


@dataclass
class Ledger:
    """Unresolved groups by uid, and the counters of the driver's side of the accounting."""

    unresolved: dict[str, Prompt] = field(default_factory=dict)
    dispatched: int = 0
    failed: int = 0
    reissued: int = 0
    _ids: itertools.count = field(default_factory=itertools.count)

    def open(self, prompts: list[Prompt], uids: list[str], *, already_dispatched: bool = False) -> Request:
        """Open a request for new prompts (or, after a resume, for pending ones)."""
        for uid, prompt in zip(uids, prompts, strict=True):
            self.unresolved[uid] = prompt
        if not already_dispatched:
            self.dispatched += len(uids)
        return Request(next(self._ids), list(uids), list(prompts))

    def reissue(self, request: Request) -> Request | None:
        """The same groups on a new attempt, or None when its attempts are spent (caller fails it)."""
        live = [(u, p) for u, p in zip(request.uids, request.prompts) if u in self.unresolved]
        if not live:
            return None
        self.reissued += 1
        uids, prompts = map(list, zip(*live))
        return Request(request.request_id, uids, prompts, request.attempt + 1)

    def fail(self, uids: list[str]) -> list[str]:
        """Give up on groups that are still unresolved; returns the uids failed now."""
        failed = [uid for uid in uids if self.unresolved.pop(uid, None) is not None]
        self.failed += len(failed)
        return failed

    def resolve(self, uids: list[str]) -> None:
        """The buffer settled these uids (trained, filtered, stale or failed there)."""
        for uid in uids:
            self.unresolved.pop(uid, None)

    def state_dict(self) -> dict:
        return {
            "dispatched": self.dispatched,
            "failed": self.failed,
            "reissued": self.reissued,
            "pending": [
                pending_entry(uid, p) for uid, p in self.unresolved.items()
            ],
        }

    def load_state_dict(self, state: dict) -> list[tuple[str, Prompt]]:
        """Restore counters; returns the pending (uid, prompt) pairs to re-issue first."""
        try:
            self.dispatched = int(state["dispatched"])
            self.failed = int(state["failed"])
            self.reissued = int(state.get("reissued", 0))
            pending = [
                (str(d["uid"]), Prompt(int(d["index"]), str(d["text"]), str(d["answer"]), dict(d["extra"]),
                                       tuple(int(t) for t in d["token_ids"])))
                for d in state["pending"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"ledger state is malformed: {exc!r}") from None
        self.unresolved.clear()
        return pending


def pending_entry(uid: str, p: Prompt) -> dict:
    """A pending group as the checkpoint holds it (JSON-native)."""
    return {"uid": uid, "index": p.index, "text": p.text, "answer": p.answer, "extra": p.extra,
            "token_ids": list(p.token_ids)}
