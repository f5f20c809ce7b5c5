"""RolloutDriver: prompts in, bounded generation requests out, each chained generator → scorer → buffer
(generator → buffer when the generators score a pure-string reward themselves).

Draws prompts from the data source (its cursor is checkpointed), keeps at most
`driver.max_inflight_requests` requests in flight, and admits new groups only while their
staleness at training time stays within `buffer.max_staleness` and the buffer has room
(`async_pmd.ledger.may_dispatch`): with `max_staleness: 0` generation waits for the weights being
trained, which is the synchronous mode. Serve handles do not retry a request whose replica died
after accepting it, so the driver keeps its own ledger: a request that fails with a dead or
unreachable replica, or times out, is re-issued (up to `driver.max_attempts`); the buffer commits
a uid once, so a late duplicate is dropped there and no group is trained twice.

With `generator.partial_rollout.enable` the driver also owns the partial groups
(`async_pmd.partial.PartialPool`): requests carry response rows (unfinished ones first, then new
groups), the generator answers with one segment per row, and a group goes on to the scorer only
once all its responses have finished; the open groups are part of the checkpoint.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections import Counter
from dataclasses import dataclass, replace

import grpc
import numpy as np
import ray
from ray import serve
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.serve.exceptions import RayServeException

from async_pmd import names, telemetry, wire
from async_pmd.config import BufferConfig, DataConfig, DriverConfig, GeneratorConfig
from async_pmd.data import Prompt, configured_source, generation_request
from async_pmd.fates import FateRecord
from async_pmd.ledger import Ledger, Request, may_dispatch, pending_entry
from async_pmd.models import load_tokenizer
from async_pmd.partial import PartialPool, Row, rows_request, to_rollout_group
from async_pmd.status import BufferStatus, DriverStatus

logger = logging.getLogger(__name__)


def direct_handle(handle):
    """A handle whose requests go straight to the replica's own gRPC server (Serve's
    `_by_reference=False`) instead of as Ray actor calls. A Serve request by actor call is a
    streaming call (the replica first answers whether it accepts, then the result): ~1.9 CPU ms in
    the caller and ~1.7 in the replica against ~0.8 and ~0.6 this way (`ops/bench/ray_call_cost.py
    --serve`). The same routing and accept/reject protocol; the answer comes back as its value,
    not a ref (a request's groups: kilobytes here, under `wire.max_bytes`, which
    `job.cluster.worker_env` makes the gRPC limit). A dead replica raises ActorUnavailableError; an
    exception of the replica's code arrives as itself, not in a RayTaskError (`_failure_kind`)."""
    return handle.options(_by_reference=False)


# A replica that died or could not be reached, Ray or Serve failing around it, or the request timing
# out: the request may succeed elsewhere or later.
_RETRYABLE = (RayError, RayServeException, grpc.aio.AioRpcError, TimeoutError, ConnectionError)


def _failure_kind(exc: BaseException) -> str | None:
    """'retry' for a replica that died / was unreachable / timed out, None for a deterministic error:
    the replica's own code raised (e.g. WireError, an over-long prompt), so retrying repeats it.
    Through the replica's gRPC server (`direct_handle`) that exception arrives as itself; a Ray actor
    call wraps it in a RayTaskError."""
    if isinstance(exc, RayTaskError) and not isinstance(exc, RayActorError):
        return None
    return "retry" if isinstance(exc, _RETRYABLE) else None


@dataclass(frozen=True)
class RowsRequest:
    """A partial-rollout request: response rows of one or more open groups."""

    request_id: int
    rows: list[Row]
    attempt: int = 1

    @property
    def uids(self) -> list[str]:
        return list(dict.fromkeys(r.uid for r in self.rows))


@ray.remote(num_cpus=0)
class RolloutDriver:
    """Owns the prompt source and the ledger; `run()` is its long-lived loop."""

    def __init__(self, *, data: DataConfig, generator: GeneratorConfig, buffer: BufferConfig,
                 driver: DriverConfig, model_path: str, namespace: str, seed: int, scored_by_generator: bool = False):
        self._data, self._generator_cfg, self._buffer_cfg, self._cfg = data, generator, buffer, driver
        self._seed = seed  # trainer.seed: with a request's uids and attempt, fixes its sampling
        self._tokenizer = load_tokenizer(model_path)
        self._source = configured_source(data, self._tokenizer, split="train")
        self._ledger = Ledger()
        partial = generator.partial_rollout
        cap = buffer.max_staleness if partial.max_segment_staleness is None else partial.max_segment_staleness
        self._pool = PartialPool(n=generator.n, response_length=generator.response_length,
                                 max_segment_staleness=cap, seed=seed) if partial.enable else None
        self._rows_ids = itertools.count()  # request ids of rows-mode requests
        self._resumed = {"resumed_groups": 0, "resumed_tokens": 0}  # open groups restored from a checkpoint
        self._fates = FateRecord()  # one fate per prompt drawn, by dispatch ordinal
        self._pending: list[tuple[str, Prompt]] = []  # restored from a checkpoint; re-issued first
        # Serve handles, taken in `run()`: the driver is built while the Serve apps deploy. The
        # scorer's is None when the generators score (`ClusterConfig.score_in_generator`).
        self._scored_by_generator = scored_by_generator
        self._generator = self._scorer = None
        self._buffer = ray.get_actor(names.BUFFER, namespace=namespace)
        self._store = ray.get_actor(names.WEIGHT_STORE, namespace=namespace)
        self._tasks: set[asyncio.Task] = set()  # one per request in flight
        self._stop = asyncio.Event()
        self._paused = False
        self._stats = {"requests": 0, "retries": 0, "backpressure_waits": 0, "deterministic_failures": 0,
                       "max_attempt": 0}
        self._failures: Counter[str] = Counter()  # failed attempts by exception type
        self._buffer_status = BufferStatus()
        self._metrics = telemetry.RoleMetrics("driver")
        # The loop sleeps until something that may let it dispatch happens: a request settles (its
        # put brings the buffer's report), a call here syncs with the buffer (the learner loop's
        # status after each step: the batch taken and trained, the publish), pauses, resumes or
        # stops it (`_wake`), or a take drops stale groups (`watch`, one call pending).
        self._wake = asyncio.Event()
        self._published = -1  # the newest published version: the store's at start, then the loop's
        self._acked = 0  # settled groups taken from the buffer's reports (its sequence numbers)
        self._watch: asyncio.Future | None = None

    async def run(self) -> None:
        """Dispatch until `stop()`; returns when every request in flight has settled."""
        generator = serve.get_deployment_handle(names.GENERATOR_DEPLOYMENT, app_name=names.GENERATOR_APP)
        self._generator = direct_handle(generator)
        if not self._scored_by_generator:
            self._scorer = direct_handle(serve.get_deployment_handle(names.SCORER_DEPLOYMENT, app_name=names.SCORER_APP))
        self._published = await self._store.version.remote()
        await self._sync_with_buffer()
        while not self._stop.is_set():
            # Buffer reports come with puts, status calls and the watch; a request that settled
            # meanwhile leaves this view behind, which only delays a dispatch (fewer settled).
            self._export_metrics()
            while not self._paused and len(self._tasks) < self._cfg.max_inflight_requests:
                request = await self._next_request()
                if request is None:
                    self._stats["backpressure_waits"] += 1
                    break
                self._launch(request)
            await self._wait_for_change()
        if self._watch is not None:
            self._watch.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        await self._sync_with_buffer()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def num_prompts(self) -> int:
        """Prompts in one epoch of the train split (after the length filter)."""
        return len(self._source)

    def pause(self) -> None:
        """Stop dispatching new requests (those in flight continue)."""
        self._paused = True
        self._wake.set()

    async def drain(self, timeout_s: float) -> int:
        """Wait until every request in flight has settled (after `pause`, no new ones start) or
        `timeout_s` has passed; returns how many are still in flight."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        return len(self._tasks)

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    async def status(self, trained_steps: int | None = None, published_version: int | None = None) -> DriverStatus:
        """Accounting of the driver's side; `unfinished` = dispatched groups not yet settled.
        `trained_steps`: the learner steps done, so the buffer counts the last batch as trained.
        `published_version`: the newest version the learner loop has published (it calls this
        after every step, its publish done), which admission counts from: no watch on the store."""
        if published_version is not None and published_version > self._published:
            self._published = published_version
            self._wake.set()
        await self._sync_from_outside(trained_steps=trained_steps)
        ledger = self._ledger
        return DriverStatus(dispatched=ledger.dispatched, failed=ledger.failed, reissued=ledger.reissued,
                            unfinished=len(ledger.unresolved) + len(self._pending),
                            inflight_requests=len(self._tasks), **self._stats, failures=dict(self._failures),
                            buffer=self._buffer_status, partial=self._partial_counters())

    async def state_dict(self, trained_steps: int) -> dict:
        """Cursor, counters, pending prompts (unsettled groups), the fate of every prompt drawn and
        the buffer's state, read together so that every dispatched group is counted exactly once
        across a resume; a batch taken for a step >= `trained_steps` is pending, not trained."""
        buffer_state = await self._sync_from_outside(with_state=True, trained_steps=trained_steps)
        state = self._ledger.state_dict()
        state["pending"] += [pending_entry(uid, p) for uid, p in self._pending]
        out = {"source": self._source.state_dict(), "ledger": state, "buffer": buffer_state,
               "fates": self._fates.state_dict()}
        if self._pool is not None:
            out["partial"] = self._pool.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore; with partial rollouts on, the saved open groups among the pending ones are
        continued from their saved responses, the other pending groups are sampled afresh."""
        self._source.load_state_dict(state["source"])
        self._pending = self._ledger.load_state_dict(state["ledger"])
        self._fates.load_state_dict(state["fates"])
        if self._pool is not None and "partial" in state:
            restored = set(self._pool.load_state_dict(state["partial"], dict(self._pending)))
            for uid, prompt in self._pending:
                if uid in restored:
                    self._ledger.open([prompt], [uid], already_dispatched=True)
            self._pending = [(u, p) for u, p in self._pending if u not in restored]
            self._resumed = {"resumed_groups": len(restored), "resumed_tokens": self._pool.saved_tokens()}

    # ------------------------------------------------------------------ helpers

    def _export_metrics(self) -> None:
        if not self._metrics.due():  # the loop wakes for every request and buffer change
            return
        ledger = self._ledger
        self._metrics.sync({"groups_dispatched_total": ledger.dispatched, "groups_failed_total": ledger.failed,
                            "retries_total": self._stats["retries"],
                            "backpressure_waits_total": self._stats["backpressure_waits"]})
        self._metrics.set("requests_inflight", len(self._tasks))
        self._metrics.set("groups_unsettled", len(ledger.unresolved) + len(self._pending))
        if self._pool is not None:
            self._metrics.sync({f"partial_{k}_total": v for k, v in self._pool.stats.items()})
            self._metrics.set("partial_open_groups", len(self._pool))
            self._metrics.set("partial_queued_rows", self._pool.queued_rows)

    async def _sync_with_buffer(self, with_state: bool = False, trained_steps: int | None = None) -> dict | None:
        first, settled, status, state = await self._buffer.report.remote(self._acked, with_state, trained_steps)
        self._apply_report(first, settled, status)
        return state

    def _apply_report(self, first: int, settled: list[tuple[str, str, int]], status: BufferStatus) -> None:
        """Settle the groups of a buffer report not settled yet (reports overlap until acknowledged)."""
        new = settled[max(self._acked - first, 0):]
        self._ledger.resolve([uid for uid, _, _ in new])
        for uid, outcome, step in new:
            self._fates.settle(uid, outcome, step)
        self._acked = max(self._acked, first + len(settled))
        if status.steps_taken >= self._buffer_status.steps_taken:  # a late reply never rolls it back
            self._buffer_status = status

    async def _sync_from_outside(self, with_state: bool = False, trained_steps: int | None = None) -> dict | None:
        """A sync asked for by the job: groups it settles may make room, so the loop looks again."""
        before = len(self._ledger.unresolved)
        state = await self._sync_with_buffer(with_state, trained_steps)
        if len(self._ledger.unresolved) < before:
            self._wake.set()
        return state

    async def _wait_for_change(self) -> None:
        """Sleep until a request settles, the buffer drops stale groups, or `_wake`."""
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._buffer.watch.remote(self._buffer_status.stale, self._acked))
        wake = asyncio.ensure_future(self._wake.wait())
        await asyncio.wait({*self._tasks, self._watch, wake}, return_when=asyncio.FIRST_COMPLETED)
        wake.cancel()
        self._wake.clear()
        if self._watch.done():
            report = self._watch.result()  # the buffer's death raises here, ending run()
            self._watch = None
            self._apply_report(*report)

    def _fail(self, uids: list[str]) -> None:
        for uid in self._ledger.fail(uids):
            self._fates.settle(uid, "failed")

    async def _next_request(self) -> Request | RowsRequest | None:
        if self._pool is not None:
            return await self._next_rows_request()
        k = self._generator_cfg.prompts_per_request
        if self._pending:
            chunk, self._pending = self._pending[:k], self._pending[k:]
            return self._ledger.open([p for _, p in chunk], [u for u, _ in chunk], already_dispatched=True)
        if not may_dispatch(
            steps_taken=self._buffer_status.steps_taken, outstanding=len(self._ledger.unresolved),
            new=k, published_version=max(self._published, 0), batch_groups=self._data.train_batch_size,
            max_staleness=self._buffer_cfg.max_staleness, capacity_groups=self._buffer_cfg.capacity_groups,
        ):
            return None
        prompts = self._source.next_batch(k)
        epoch = self._source.epoch
        uids = [f"e{epoch}-i{p.index}-d{self._ledger.dispatched + j}" for j, p in enumerate(prompts)]
        self._fates.dispatch(len(uids))
        return self._ledger.open(prompts, uids)

    def _launch(self, request: Request | RowsRequest) -> None:
        run = self._run_rows_request if isinstance(request, RowsRequest) else self._run_request
        task = asyncio.create_task(run(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_request(self, request: Request) -> None:
        while True:
            try:
                await self._chain(request)
                self._stats["max_attempt"] = max(self._stats["max_attempt"], request.attempt)
                return
            except Exception as exc:  # noqa: BLE001 - every failure is classified and counted in _retryable
                if not self._retryable(request.request_id, request.attempt, exc):
                    self._fail(request.uids)
                    return
                request = self._ledger.reissue(request)
                if request is None:
                    return

    async def _chain(self, request: Request) -> None:
        """generator → scorer → buffer (generator → buffer when the generator scores): each
        answer's wire bytes come back here (small: a request's groups) and go on as the next
        call's argument."""
        self._stats["requests"] += 1
        payload = wire.encode_array(generation_request(
            request.request_id, request.attempt, request.uids, request.prompts,
            sampling={"seed": self._sampling_seed(request)}))
        rollouts = await self._resolved(self._generator.generate.remote(payload))
        if self._scorer is not None:
            rollouts = await self._resolved(self._scorer.score.remote(rollouts))
        await self._put_scored(rollouts, request.uids)

    async def _resolved(self, response) -> np.ndarray:
        """A Serve response's value (wire bytes); TimeoutError past the request timeout."""
        return await asyncio.wait_for(response, self._generator_cfg.request_timeout_s)

    async def _put_scored(self, scored: np.ndarray, uids: list[str]) -> None:
        """Scored wire bytes into the buffer; a refused batch fails its groups."""
        counts = await self._buffer.put.remote(scored, self._acked)
        self._apply_report(*counts["report"])
        if counts.get("refused"):
            self._fail(uids)

    def _sampling_seed(self, request: Request) -> int:
        """A seed from trainer.seed, the request's uids and its attempt: a retried request samples
        afresh, yet two runs with the same seed send the same seeds."""
        key = f"{self._seed}|{','.join(request.uids)}|{request.attempt}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1

    # ------------------------------------------------------------------ partial rollouts

    def _partial_counters(self) -> dict[str, int]:
        if self._pool is None:
            return {}
        return {**self._pool.stats, "open_groups": len(self._pool), "queued_rows": self._pool.queued_rows,
                **self._resumed}

    async def _next_rows_request(self) -> RowsRequest | None:
        """Unfinished rows first (oldest group first); room left in the request's k·n rows takes
        new groups, pending ones first, then fresh prompts under the same admission as without
        partial rollouts (a group's oldest segment is never older than the weights it was
        admitted with, so the staleness estimate of `may_dispatch` still bounds it)."""
        cfg, pool = self._generator_cfg, self._pool
        max_rows = cfg.prompts_per_request * cfg.n
        version = max(await self._store.version.remote(), 0)
        new = (max_rows - pool.queued_rows) // cfg.n
        if new > 0 and self._pending:
            chunk, self._pending = self._pending[:new], self._pending[new:]
            self._ledger.open([p for _, p in chunk], [u for u, _ in chunk], already_dispatched=True)
            for uid, prompt in chunk:
                pool.open(uid, prompt)
        elif new > 0 and may_dispatch(
            steps_taken=self._buffer_status.steps_taken, outstanding=len(self._ledger.unresolved),
            new=new, published_version=version, batch_groups=self._data.train_batch_size,
            max_staleness=self._buffer_cfg.max_staleness, capacity_groups=self._buffer_cfg.capacity_groups,
        ):
            prompts = self._source.next_batch(new)
            uids = [f"e{self._source.epoch}-i{p.index}-d{self._ledger.dispatched + j}" for j, p in enumerate(prompts)]
            self._fates.dispatch(len(uids))
            self._ledger.open(prompts, uids)
            for uid, prompt in zip(uids, prompts):
                pool.open(uid, prompt)
        rows = pool.next_rows(max_rows, version)
        return RowsRequest(next(self._rows_ids), rows) if rows else None

    async def _run_rows_request(self, request: RowsRequest) -> None:
        """Generate one segment per row (re-issuing the same rows, same keys, after a replica
        died), then send the groups this completed on to the scorer and the buffer."""
        while True:
            try:
                segments = await self._generate_rows(request)
                break
            except Exception as exc:  # noqa: BLE001 - classified and counted as in _run_request
                if not self._retryable(request.request_id, request.attempt, exc):
                    self._pool.fail(request.uids)
                    self._fail(request.uids)
                    return
                request = replace(request, attempt=request.attempt + 1)
        self._stats["max_attempt"] = max(self._stats["max_attempt"], request.attempt)
        done = self._pool.add(segments)
        if done:
            groups = [to_rollout_group(g, self._decode_texts) for g in done]
            await self._score_and_put(request.request_id, groups)

    async def _generate_rows(self, request: RowsRequest) -> wire.SegmentBatch:
        self._stats["requests"] += 1
        payload = wire.encode_array(rows_request(request.request_id, request.attempt, request.rows, {}))
        data = await self._resolved(self._generator.generate.remote(payload))
        return wire.decode(data, expect=wire.SegmentBatch)

    async def _score_and_put(self, request_id: int, groups: list[wire.RolloutGroup]) -> None:
        """scorer → buffer for complete groups, retried like a request (they are not regenerated)."""
        uids = [g.uid for g in groups]
        payload = wire.encode_array(wire.RolloutBatch(groups=groups))
        for attempt in itertools.count(1):
            try:
                await self._put_scored(await self._resolved(self._scorer.score.remote(payload)), uids)
                return
            except Exception as exc:  # noqa: BLE001 - classified and counted as in _run_request
                if not self._retryable(request_id, attempt, exc):
                    self._fail(uids)
                    return

    def _retryable(self, request_id: int, attempt: int, exc: BaseException) -> bool:
        """Count a failed attempt; whether to try it again."""
        self._failures[type(exc).__name__] += 1
        logger.warning("request %d attempt %d failed: %r", request_id, attempt, exc)
        if _failure_kind(exc) is None:
            self._stats["deterministic_failures"] += 1
            return False
        if attempt >= self._cfg.max_attempts:
            return False
        self._stats["retries"] += 1
        return True

    def _decode_texts(self, ids) -> list[str]:
        return self._tokenizer.batch_decode(ids, skip_special_tokens=True)
