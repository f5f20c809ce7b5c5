"""RolloutDriver: prompts in, bounded generation requests out, each chained generator → scorer → buffer.

Draws prompts from the data source (its cursor is checkpointed), keeps at most
`driver.max_inflight_requests` requests in flight, and admits new groups only while their
staleness at training time stays within `buffer.max_staleness` and the buffer has room
(`async_pmd.ledger.may_dispatch`): with `max_staleness: 0` generation waits for the weights being
trained, which is the synchronous mode. Serve handles do not retry a request whose replica died
after accepting it, so the driver keeps its own ledger: a request that fails with a dead or
unreachable replica, or times out, is re-issued (up to `driver.max_attempts`); the buffer commits
a uid once, so a late duplicate is dropped there and no group is trained twice.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from async_pmd import telemetry, wire
from async_pmd.config import ClusterConfig
from async_pmd.data import Prompt, build_source, format_prompt
from async_pmd.ledger import Ledger, Request, may_dispatch
from async_pmd.models import load_tokenizer
from services.buffer import BUFFER_NAME
from services.generator import APP_NAME as GENERATOR_APP
from services.scorer import APP_NAME as SCORER_APP
from services.weights import STORE_NAME

logger = logging.getLogger(__name__)

DRIVER_NAME = "rollout_driver"
_POLL_S = 0.02  # how often an idle driver looks at the buffer and the store
_SCALARS = (bool, int, float, str)


def prompt_source(cfg: ClusterConfig, tokenizer, split: str):
    """The configured prompts of `split`, length-limited with the tokens the engine will see."""
    data = cfg.data
    synthetic = data.source == "synthetic"
    files = {"train": data.train_files, "val": data.val_files}
    return build_source(
        "synthetic" if synthetic else "files", task=data.task if synthetic else None,
        files=None if synthetic else files, split=split, seed=data.seed,
        size=data.synthetic_size if synthetic and split == "train" else None,
        prompt_key=data.prompt_key, answer_key=data.answer_key, shuffle=data.shuffle,
        tokenize_fn=lambda t: tokenizer(format_prompt(t, tokenizer, data.apply_chat_template),
                                        add_special_tokens=False)["input_ids"],
        max_prompt_length=data.max_prompt_length, length_policy=data.overlong_prompts,
    )


def _failure_kind(exc: BaseException) -> str | None:
    """'retry' for a replica that died / was unreachable / timed out, None for a deterministic error."""
    if isinstance(exc, RayTaskError) and not isinstance(exc, RayActorError):
        return None  # the request itself is bad (e.g. WireError, over-long prompt): retrying repeats it
    return "retry"


@ray.remote(num_cpus=0)
class RolloutDriver:
    """Owns the prompt source, the tokenizer and the ledger; `run()` is its long-lived loop."""

    def __init__(self, config: dict):
        self._cfg = cfg = ClusterConfig.model_validate(config)
        self._tokenizer = load_tokenizer(cfg.model.path)
        self._source = prompt_source(cfg, self._tokenizer, split="train")
        self._ledger = Ledger()
        self._pending: list[tuple[str, Prompt]] = []  # restored from a checkpoint; re-issued first
        self._generator = serve.get_deployment_handle("Generator", app_name=GENERATOR_APP)
        self._scorer = serve.get_deployment_handle("RewardScorer", app_name=SCORER_APP)
        self._buffer = ray.get_actor(BUFFER_NAME, namespace=cfg.ray.namespace)
        self._store = ray.get_actor(STORE_NAME, namespace=cfg.ray.namespace)
        self._tasks: set[asyncio.Task] = set()  # one per request in flight
        self._stop = asyncio.Event()
        self._paused = False
        self._stats = {"requests": 0, "retries": 0, "backpressure_waits": 0, "deterministic_failures": 0}
        self._buffer_view: dict = {}
        self._metrics = telemetry.RoleMetrics("driver")

    async def run(self) -> None:
        """Dispatch until `stop()`; returns when every request in flight has settled."""
        while not self._stop.is_set():
            await self._sync_with_buffer()
            self._export_metrics()
            while not self._paused and len(self._tasks) < self._cfg.driver.max_inflight_requests:
                request = await self._next_request()
                if request is None:
                    self._stats["backpressure_waits"] += 1
                    break
                self._launch(request)
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=_POLL_S, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(_POLL_S)
        if self._tasks:
            await asyncio.wait(self._tasks)
        await self._sync_with_buffer()

    def stop(self) -> None:
        self._stop.set()

    def pause(self) -> None:
        """Stop dispatching new requests (those in flight continue)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False

    async def status(self) -> dict:
        """Accounting of the driver's side; `unfinished` = dispatched groups not yet settled."""
        await self._sync_with_buffer()
        ledger = self._ledger
        return {"dispatched": ledger.dispatched, "failed": ledger.failed, "reissued": ledger.reissued,
                "unfinished": len(ledger.unresolved) + len(self._pending),
                "inflight_requests": len(self._tasks), **self._stats, "buffer": self._buffer_view}

    async def state_dict(self) -> dict:
        """Cursor, counters, pending prompts (unsettled groups) and the buffer's state, read together
        so that every dispatched group is counted exactly once across a resume."""
        buffer_state = await self._sync_with_buffer(with_state=True)
        state = self._ledger.state_dict()
        state["pending"] += [self._pending_entry(uid, p) for uid, p in self._pending]
        return {"source": self._source.state_dict(), "ledger": state, "buffer": buffer_state}

    def load_state_dict(self, state: dict) -> None:
        self._source.load_state_dict(state["source"])
        self._pending = self._ledger.load_state_dict(state["ledger"])

    # ------------------------------------------------------------------ helpers

    def _export_metrics(self) -> None:
        if not self._metrics.due():  # the loop spins every _POLL_S while it waits
            return
        ledger = self._ledger
        self._metrics.sync({"groups_dispatched_total": ledger.dispatched, "groups_failed_total": ledger.failed,
                            "retries_total": self._stats["retries"],
                            "backpressure_waits_total": self._stats["backpressure_waits"]})
        self._metrics.set("requests_inflight", len(self._tasks))
        self._metrics.set("groups_unsettled", len(ledger.unresolved) + len(self._pending))

    async def _sync_with_buffer(self, with_state: bool = False) -> dict | None:
        view = await self._buffer.poll.remote(with_state)
        self._ledger.resolve(view.pop("resolved"))
        state = view.pop("state", None)
        self._buffer_view = view
        return state

    async def _next_request(self) -> Request | None:
        k = self._cfg.generator.prompts_per_request
        if self._pending:
            chunk, self._pending = self._pending[:k], self._pending[k:]
            return self._ledger.open([p for _, p in chunk], [u for u, _ in chunk], already_dispatched=True)
        version = await self._store.version.remote()
        if not may_dispatch(
            steps_taken=self._buffer_view.get("steps_taken", 0), outstanding=len(self._ledger.unresolved),
            new=k, published_version=max(version, 0), batch_groups=self._cfg.data.train_batch_size,
            max_staleness=self._cfg.buffer.max_staleness, capacity_groups=self._cfg.buffer.capacity_groups,
        ):
            return None
        prompts = self._source.next_batch(k)
        epoch = self._source.epoch
        uids = [f"e{epoch}-i{p.index}-d{self._ledger.dispatched + j}" for j, p in enumerate(prompts)]
        return self._ledger.open(prompts, uids)

    def _launch(self, request: Request) -> None:
        task = asyncio.create_task(self._run_request(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_request(self, request: Request) -> None:
        while True:
            try:
                await self._chain(request)
                # The highest attempt that completed: 2 after a replica death means "re-issued once".
                self._stats["max_attempt"] = max(self._stats.get("max_attempt", 0), request.attempt)
                return
            except Exception as exc:  # noqa: BLE001 - every failure is classified and counted below
                retry = _failure_kind(exc)
                kind = f"failures/{type(exc).__name__}"  # e.g. RayServeException (replica died), TimeoutError
                self._stats[kind] = self._stats.get(kind, 0) + 1
                logger.warning("request %d attempt %d failed: %r", request.request_id, request.attempt, exc)
                if retry is None:
                    self._stats["deterministic_failures"] += 1
                    self._ledger.fail(request.uids)
                    return
                if request.attempt >= self._cfg.driver.max_attempts:
                    self._ledger.fail(request.uids)
                    return
                self._stats["retries"] += 1
                request = self._ledger.reissue(request)
                if request is None:
                    return

    async def _chain(self, request: Request) -> None:
        """generator → scorer → buffer, passing object refs; only the buffer's counts come back here."""
        self._stats["requests"] += 1
        payload = wire.encode_array(self._encode(request))
        rollouts = self._generator.generate.remote(payload)
        scored = self._scorer.score.remote(rollouts)
        timeout_s = self._cfg.generator.request_timeout_s
        ref = await asyncio.wait_for(scored._to_object_ref(), timeout_s)
        await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout_s)
        counts = await self._buffer.put.remote(ref)
        if counts.get("refused"):
            self._ledger.fail(request.uids)

    def _encode(self, request: Request) -> wire.GenerationRequest:
        texts = [format_prompt(p.text, self._tokenizer, self._cfg.data.apply_chat_template) for p in request.prompts]
        ids = self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        return wire.GenerationRequest(
            request_id=request.request_id, attempt=request.attempt, uids=request.uids,
            prompt_ids=[np.asarray(x, np.int32) for x in ids], prompt_texts=[p.text for p in request.prompts],
            answers=[p.answer for p in request.prompts], sample_indices=[p.index for p in request.prompts],
            extras=[{k: v for k, v in p.extra.items() if isinstance(v, _SCALARS)} for p in request.prompts],
            sampling={},
        )

    @staticmethod
    def _pending_entry(uid: str, p: Prompt) -> dict:
        return {"uid": uid, "index": p.index, "text": p.text, "answer": p.answer, "extra": p.extra}
