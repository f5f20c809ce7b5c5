"""RewardRunner: score groups of responses with a reward function in worker processes that a
hang cannot outlive, turning every failure into a status instead of an exception. The
RewardScorer service owns one.

Statuses: "ok", "failed:timeout", "failed:exception:<ExcType>", "failed:nonfinite" (NaN or inf
score), "failed:type" (not a number, or a dict without a numeric "score"), "failed:crash" (the
worker process died). A failed response's reward is 0.0; its status tells the GroupBuffer,
which trains or drops the group by its own policy (`buffer.on_reward_failure`). `failures`
counts them by reason ("timeout", ...).

Python cannot kill a thread, so the calls run in a pebble `ProcessPool` (forkserver) of
`max_workers` processes, one task per group. Inside the task each call gets `timeout_s` from a
timer signal (a pure-Python loop, e.g. math-verify's sympy on a pathological answer, stops
there and the next call runs); a call stuck in C code past the task's whole budget gets its
worker killed and replaced by pebble, and the group's unscored responses fail as timeouts. So
the scorer's threads and processes stay bounded whatever the reward does.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import signal
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
from pebble import ProcessExpired, ProcessPool

from async_pmd.config import ScorerConfig
from async_pmd.rewards.builtin import RewardFn
from async_pmd.wire import RolloutGroup, ScoredGroup

logger = logging.getLogger(__name__)

# A task's hard limit beyond its calls' soft ones: the time to start a call and send results back.
_TASK_SLACK_S = 2.0
Outcome = tuple[str, float, dict[str, float]]


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


def runner_for(scorer: ScorerConfig, max_resp_len: int, inline: bool) -> RewardRunner:
    """The runner `scorer` configures; `inline` (`ClusterConfig.scorer_inline`) calls the reward
    in the caller's thread, with no worker process and no timeout."""
    overlong = scorer.overlong_buffer
    return RewardRunner(scorer.reward_fn, timeout_s=None if inline else scorer.timeout_s,
                        max_workers=scorer.num_workers, overlong_buffer_len=overlong.len if overlong.enable else 0,
                        overlong_penalty_factor=overlong.penalty_factor, max_resp_len=max_resp_len)


class RewardRunner:
    """Scores groups with one reward function; owns the worker processes and failure counters.

    `reward` is a spec (`load_reward_fn`) or an importable module-level function: each worker
    loads it. `timeout_s=None` runs calls inline in the caller's thread with no timeout and no
    process (trusted, fast functions; tests). With `overlong_buffer_len > 0`, scoring needs
    token lengths and adds `overlong_penalty` to every successful score.
    """

    def __init__(
        self,
        reward: str | RewardFn,
        timeout_s: float | None = 10.0,
        *,
        max_workers: int = 2,
        overlong_buffer_len: int = 0,
        overlong_penalty_factor: float = 1.0,
        max_resp_len: int | None = None,
    ):
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None (no timeout), got {timeout_s}")
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        if overlong_buffer_len < 0 or overlong_penalty_factor < 0:
            raise ValueError("overlong_buffer_len and overlong_penalty_factor must be >= 0")
        if overlong_buffer_len > 0 and (max_resp_len is None or max_resp_len < overlong_buffer_len):
            raise ValueError(
                f"the overlong penalty needs max_resp_len >= overlong_buffer_len "
                f"({overlong_buffer_len}), got max_resp_len={max_resp_len}"
            )
        from async_pmd.rewards.custom import load_reward_fn

        # Loaded here too, so a bad spec fails at construction, not in a worker.
        self.fn = load_reward_fn(reward) if isinstance(reward, str) else reward
        self.timeout_s = timeout_s
        self.overlong_buffer_len = overlong_buffer_len
        self.overlong_penalty_factor = overlong_penalty_factor
        self.max_resp_len = max_resp_len
        self.failures: Counter[str] = Counter()  # failed calls by reason, e.g. "timeout"
        self.num_calls = 0
        # Scoring may run in several threads at once (the scorer serves requests in parallel);
        # the counters are the only state they share outside the pool.
        self._counter_lock = threading.Lock()
        self._reward, self.max_workers = reward, max_workers
        self._pool_lock = threading.Lock()  # the pool is replaced if pebble declares it broken
        self._pool = None if timeout_s is None else self._new_pool()

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
        return self.score_groups([(prompt, responses, ground_truth, extra, response_lengths)])[0]

    def score_groups(self, groups: Sequence[tuple]) -> list[tuple[np.ndarray, list[str], dict[str, list[float]]]]:
        """`score_group` for each (prompt, responses, ground_truth, extra, response_lengths), the
        groups' calls sent to the workers at once."""
        for _, responses, _, _, lengths in groups:
            if lengths is not None and len(lengths) != len(responses):
                raise ValueError(f"{len(lengths)} response_lengths for {len(responses)} responses")
            if self.overlong_buffer_len > 0 and lengths is None:
                raise ValueError("the overlong penalty is on: pass response_lengths (tokens)")
        # each call gets its own copy of extra, so a function that edits it cannot race itself
        calls = [[(prompt, r, truth, dict(extra)) for r in responses] for prompt, responses, truth, extra, _ in groups]
        return [self._assemble(outcomes, g[4]) for outcomes, g in zip(self._run(calls), groups)]

    def score_rollouts(self, groups: Sequence[RolloutGroup]) -> list[ScoredGroup]:
        """Each rollout group with its rewards, statuses and extras (its token counts feed the
        overlong penalty)."""
        results = self.score_groups([
            (g.prompt_text, g.response_texts, g.answer, dict(g.extra), [len(r) for r in g.response_ids])
            for g in groups])
        return [ScoredGroup.from_rollout(g, *result) for g, result in zip(groups, results)]

    def _assemble(self, outcomes: list[Outcome], response_lengths) -> tuple[np.ndarray, list[str], dict]:
        n = len(outcomes)
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
        """Stop the worker processes (a call still running is killed)."""
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()

    def worker_pids(self) -> list[int]:
        """The live worker processes (bounded by `max_workers`)."""
        import psutil

        return [c.pid for c in psutil.Process().children(recursive=True)
                if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]

    def _new_pool(self) -> ProcessPool:
        return ProcessPool(max_workers=self.max_workers, initializer=_init_worker, initargs=(self._reward,),
                           context=multiprocessing.get_context("forkserver"))

    def _run(self, calls: list[list[tuple]]) -> list[list[Outcome]]:
        if self._pool is None:
            return [[_outcome(*_call_inline(self.fn, args)) for args in group] for group in calls]
        with self._pool_lock:
            if not self._pool.active:  # pebble gives a pool up when a worker dies between tasks
                logger.warning("the reward worker pool broke (a worker died): starting a new one")
                self._pool = self._new_pool()
            pool = self._pool
        futures = [pool.schedule(_score_calls, args=(group, self.timeout_s),
                                 timeout=len(group) * self.timeout_s + _TASK_SLACK_S) for group in calls]
        return [self._result(future, len(group)) for future, group in zip(futures, calls)]

    def _result(self, future, n: int) -> list[Outcome]:
        try:
            return future.result()
        except FutureTimeout:
            logger.warning("a reward task ran past its %.3g s budget: its worker was killed and replaced",
                           n * self.timeout_s + _TASK_SLACK_S)
            return [("failed:timeout", math.nan, {})] * n
        except (ProcessExpired, BrokenProcessPool) as exc:
            logger.warning("a reward worker died (%s): replaced", exc)
            return [("failed:crash", math.nan, {})] * n
        except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be sent back
            return [(f"failed:exception:{type(exc).__name__}", math.nan, {})] * n


# ---------------------------------------------------------------- in the worker process

_worker_fn: RewardFn | None = None


class _SoftTimeout(BaseException):
    """Raised into a reward call by the timer signal (a BaseException: `except Exception` in user
    code does not swallow it)."""


def _on_alarm(signum, frame):
    raise _SoftTimeout


def _init_worker(reward: str | RewardFn) -> None:
    global _worker_fn
    from async_pmd.rewards.custom import load_reward_fn

    _worker_fn = load_reward_fn(reward) if isinstance(reward, str) else reward
    signal.signal(signal.SIGALRM, _on_alarm)


def _score_calls(calls: list[tuple], timeout_s: float) -> list[Outcome]:
    """Run in a worker: each call under its own `timeout_s` timer."""
    out = []
    for args in calls:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            out.append(_outcome(_worker_fn(*args), None))
        except _SoftTimeout:
            out.append(("failed:timeout", math.nan, {}))
        except Exception as e:  # noqa: BLE001 - user code; reported as a status
            out.append(_outcome(None, e))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return out


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
