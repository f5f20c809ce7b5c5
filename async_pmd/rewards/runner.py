"""RewardRunner: score one group of responses with a reward function, under a per-call timeout,
turning every failure into a status instead of an exception. The Scorer service owns one.

Statuses: "ok", "failed:timeout", "failed:exception:<ExcType>", "failed:nonfinite" (NaN or inf
score), "failed:type" (not a number, or a dict without a numeric "score"), "failed:stuck" (not
run: `max_stuck_threads` threads are still stuck in earlier calls). A failed response's
reward is 0.0; its status tells the GroupBuffer, which trains or drops the group by its own
policy (`buffer.on_reward_failure`). `failures` counts them by reason ("timeout", ...).

Python cannot kill a thread: a call past its timeout is abandoned, not stopped. Its worker keeps
running it (a daemon thread, so it never blocks exit) and a fresh worker takes its place;
`num_stuck` counts such threads. A CPU-bound one also competes for the GIL (math-verify's sympy
can spin on a pathological answer), so past `max_stuck_threads` the runner stops calling the
function until some return, rather than leaking a thread per call.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from async_pmd.rewards.builtin import RewardFn

logger = logging.getLogger(__name__)



def overlong_penalty(
    response_length: int, max_resp_len: int, buffer_len: int, penalty_factor: float
) -> float:
    """DAPO's soft overlong punishment, as verl's DAPORewardManager adds it to the score.

    Zero up to `max_resp_len - buffer_len` tokens, then falling linearly to `-penalty_factor`
    at `max_resp_len`: min(-(L - (max_resp_len - buffer_len)) / buffer_len * factor, 0).
    """
    if buffer_len <= 0:
        raise ValueError(f"buffer_len must be > 0, got {buffer_len}")
    exceed = response_length - (max_resp_len - buffer_len)
    if exceed <= 0:
        return 0.0
    return -exceed / buffer_len * penalty_factor


class _Call:
    """One reward call. Its lock decides, exactly once, whether the caller took the result or
    abandoned the call: a result that arrives after `abandon()` is discarded."""

    def __init__(self, fn: RewardFn, args: tuple):
        self.fn, self.args = fn, args
        self.started_at: float | None = None  # time.monotonic() when a worker picked it up
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._abandoned = False

    def run(self) -> bool:
        """Run in a worker thread; True if the caller had already abandoned the call."""
        self.started_at = time.monotonic()
        result, error = None, None
        try:
            result = self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 - user code; reported as a status
            error = e
        with self._lock:
            self.result, self.error = result, error
            self.done.set()
            return self._abandoned

    def abandon(self) -> bool:
        """False if the call finished in the meantime (then its result stands)."""
        with self._lock:
            if self.done.is_set():
                return False
            self._abandoned = True
            return True


class _WorkerPool:
    """`size` daemon threads over one queue; a thread stuck in an abandoned call is replaced at
    once and exits if its call ever returns, so `size` threads are always free to take work."""

    def __init__(self, size: int):
        self._size = size
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards num_stuck
        self.num_stuck = 0
        for _ in range(size):
            self._start_worker()

    def submit(self, fn: RewardFn, args: tuple) -> _Call:
        call = _Call(fn, args)
        self._queue.put(call)
        return call

    def abandon(self, call: _Call) -> bool:
        """Give up on a running call; False if it finished just now."""
        if not call.abandon():
            return False
        with self._lock:
            self.num_stuck += 1
        self._start_worker()
        return True

    def close(self) -> None:
        for _ in range(self._size):
            self._queue.put(None)

    def _start_worker(self) -> None:
        threading.Thread(target=self._work, name="reward-worker", daemon=True).start()

    def _work(self) -> None:
        while (call := self._queue.get()) is not None:
            if call.run():  # a replacement already took this thread's place
                with self._lock:
                    self.num_stuck -= 1
                return


class RewardRunner:
    """Scores groups with one reward function; owns the worker threads and failure counters.

    `timeout_s=None` runs calls inline in the caller's thread with no timeout (trusted, fast
    functions). With `overlong_buffer_len > 0`, `score_group` needs token lengths and adds
    `overlong_penalty` to every successful score.
    """

    def __init__(
        self,
        fn: RewardFn,
        timeout_s: float | None = 10.0,
        *,
        max_workers: int = 4,
        max_stuck_threads: int = 64,
        overlong_buffer_len: int = 0,
        overlong_penalty_factor: float = 1.0,
        max_resp_len: int | None = None,
    ):
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None (no timeout), got {timeout_s}")
        if max_workers < 1 or max_stuck_threads < 1:
            raise ValueError("max_workers and max_stuck_threads must be >= 1")
        if overlong_buffer_len < 0 or overlong_penalty_factor < 0:
            raise ValueError("overlong_buffer_len and overlong_penalty_factor must be >= 0")
        if overlong_buffer_len > 0 and (max_resp_len is None or max_resp_len < overlong_buffer_len):
            raise ValueError(
                f"the overlong penalty needs max_resp_len >= overlong_buffer_len "
                f"({overlong_buffer_len}), got max_resp_len={max_resp_len}"
            )
        self.fn = fn
        self.timeout_s = timeout_s
        self.max_stuck_threads = max_stuck_threads
        self.overlong_buffer_len = overlong_buffer_len
        self.overlong_penalty_factor = overlong_penalty_factor
        self.max_resp_len = max_resp_len
        self.failures: Counter[str] = Counter()  # failed calls by reason, e.g. "timeout"
        self.num_calls = 0
        # score_group may run in several threads at once (the scorer serves requests in
        # parallel); the counters are the only state they share outside the pool.
        self._counter_lock = threading.Lock()
        self._pool = _WorkerPool(max_workers) if timeout_s is not None else None

    @property
    def num_stuck(self) -> int:
        """Worker threads still running a call that timed out."""
        return self._pool.num_stuck if self._pool is not None else 0

    def score_group(
        self,
        prompt: str,
        responses: Sequence[str],
        ground_truth: str,
        extra: dict,
        response_lengths: Sequence[int] | None = None,
    ) -> tuple[np.ndarray, list[str], dict[str, list[float]]]:
        """(rewards float32[n], statuses, extras: metric -> n floats, NaN where absent).

        Never raises because of the reward function; raises ValueError only for a caller's
        mistake (lengths that do not match, or missing while the overlong penalty is on).
        """
        n = len(responses)
        if response_lengths is not None and len(response_lengths) != n:
            raise ValueError(f"{len(response_lengths)} response_lengths for {n} responses")
        if self.overlong_buffer_len > 0 and response_lengths is None:
            raise ValueError("the overlong penalty is on: pass response_lengths (tokens)")
        # each call gets its own copy of extra, so a function that edits it cannot race itself
        outcomes = self._run_calls([(prompt, r, ground_truth, dict(extra)) for r in responses])
        rewards = np.empty(n, dtype=np.float32)
        statuses: list[str] = []
        extras: dict[str, list[float]] = {}
        for i, (status, score, metrics) in enumerate(outcomes):
            if status != "ok":
                score = 0.0
            elif self.overlong_buffer_len > 0:
                penalty = overlong_penalty(
                    response_lengths[i], self.max_resp_len, self.overlong_buffer_len,
                    self.overlong_penalty_factor,
                )  # fmt: skip
                metrics = {**metrics, "overlong_reward": penalty, "overlong": float(penalty < 0)}
                score += penalty
            rewards[i] = score
            statuses.append(status)
            for key, value in metrics.items():
                extras.setdefault(key, [math.nan] * n)[i] = value
        with self._counter_lock:
            self.num_calls += n
            self.failures.update(s.removeprefix("failed:") for s in statuses if s != "ok")
        return rewards, statuses, extras

    def close(self) -> None:
        """Let the idle worker threads exit; stuck ones exit when (if) their call returns."""
        if self._pool is not None:
            self._pool.close()

    def _run_calls(self, calls: list[tuple]) -> list[tuple[str, float, dict[str, float]]]:
        if self._pool is None:
            return [_outcome(*_call_inline(self.fn, args)) for args in calls]
        if self._pool.num_stuck >= self.max_stuck_threads:
            logger.error("%d reward threads stuck: refusing calls until some return", self.num_stuck)
            return [("failed:stuck", math.nan, {})] * len(calls)
        pending = [self._pool.submit(self.fn, args) for args in calls]
        outcomes = []
        for call in pending:  # in submission order, so earlier calls' workers are freed first
            if self._wait(call):
                outcomes.append(_outcome(call.result, call.error))
            else:
                outcomes.append(("failed:timeout", math.nan, {}))
        return outcomes

    def _wait(self, call: _Call) -> bool:
        """True once the call finished; False if it ran past timeout_s and was abandoned."""
        while not call.done.is_set():
            if call.started_at is None:  # queued: the clock starts when a worker takes it
                call.done.wait(self.timeout_s)
                continue
            remaining = call.started_at + self.timeout_s - time.monotonic()
            if remaining <= 0:
                if self._pool.abandon(call):
                    logger.warning(
                        "reward call timed out after %.3gs; %d worker threads stuck",
                        self.timeout_s, self._pool.num_stuck,
                    )  # fmt: skip
                    return False
                return True
            call.done.wait(remaining)
        return True


def _call_inline(fn: RewardFn, args: tuple) -> tuple[Any, BaseException | None]:
    try:
        return fn(*args), None
    except Exception as e:  # noqa: BLE001 - user code; reported as a status
        return None, e


def _outcome(result: Any, error: BaseException | None) -> tuple[str, float, dict[str, float]]:
    """(status, score, numeric metrics) of one finished call."""
    if error is not None:
        return f"failed:exception:{type(error).__name__}", math.nan, {}
    metrics: dict[str, float] = {}
    if isinstance(result, dict):
        metrics = {k: float(v) for k, v in result.items() if k != "score" and _is_number(v)}
        result = result.get("score")
    if not _is_number(result):
        return "failed:type", math.nan, {}
    score = float(result)
    if not math.isfinite(score):
        return "failed:nonfinite", math.nan, {}
    return "ok", score, metrics


def _is_number(value: Any) -> bool:
    # bool counts (verl scorers return True/False); numpy scalars count; strings and None do not
    return isinstance(value, (int, float, np.integer, np.floating))
