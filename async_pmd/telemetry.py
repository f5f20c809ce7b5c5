"""Prometheus metrics of every actor: one table of definitions, recorded through Ray's metrics agent.

Each actor records with `ray.util.metrics` (Ray core, not Serve); Ray's per-node agent exports
them on the metrics export port (`metrics.export_port`), where Prometheus scrapes them. Ray puts
its namespace in front of every application metric (`ray_async_pmd_...` on the port);
`ops/prometheus.yml` renames them back at scrape time, so Prometheus and the Grafana dashboard
hold `async_pmd_<role>_<metric>`. Ray adds `WorkerId`, `NodeAddress`, `SessionName` labels;
Serve replicas add `replica`, learner ranks `rank`.

Why not `prometheus_client` directly: one listener per actor process, on ports that change as
replicas come and go, and a scrape config that has to follow them; Ray's agent already gathers
every worker of a node on one port and, on a cluster, lists those ports in its service-discovery
file.

Nothing here touches Ray until a metric is first recorded, so the module imports (and the table
is testable) without a running Ray. README's metrics table lists exactly `METRICS`.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

PREFIX = "async_pmd_"
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
# Ray wants positive bucket bounds: le="0.5" holds staleness 0, le="1.5" staleness 1, ...
_STEPS = (0.5, 1.5, 2.5, 3.5, 4.5, 8.5, 16.5, 32.5)
# Ray (2.60) exports a gauge only while it is recorded again within ~2 report intervals (1 s
# each): a value set once, like `up` or an idle replica's `requests_inflight`, vanishes after
# ~2 s. RoleMetrics re-records its gauges' last values this often.
GAUGE_REFRESH_S = 1.0


@dataclass(frozen=True)
class Spec:
    kind: Literal["counter", "gauge", "histogram"]
    unit: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


_REPLICA, _RANK = ("replica",), ("rank",)

# Name in Prometheus (prefix included; counters end in `_total`) -> definition.
METRICS: dict[str, Spec] = {
    # generator (one Serve replica each)
    "async_pmd_generator_up": Spec("gauge", "1", "1 while the replica lives; count() = replicas", _REPLICA),
    "async_pmd_generator_requests_inflight": Spec(
        "gauge", "requests", "requests in the replica (queued for the engine or running)", _REPLICA),
    "async_pmd_generator_request_seconds": Spec(
        "histogram", "s", "request latency, queueing for the engine included", _REPLICA, _SECONDS),
    "async_pmd_generator_generate_seconds": Spec(
        "histogram", "s", "engine time of one request's batch", _REPLICA, _SECONDS),
    "async_pmd_generator_tokens_total": Spec(
        "counter", "tokens", "response tokens generated; rate() = rollout tokens/s", _REPLICA),
    "async_pmd_generator_responses_total": Spec("counter", "responses", "responses generated", _REPLICA),
    "async_pmd_generator_policy_version": Spec(
        "gauge", "version", "policy version the replica serves", _REPLICA),
    "async_pmd_generator_weight_pull_seconds": Spec(
        "histogram", "s", "fetch + load of newer weights (decode, or receive by broadcast); _count = pulls",
        _REPLICA, _SECONDS),
    # scorer (one Serve replica each)
    "async_pmd_scorer_up": Spec("gauge", "1", "1 while the replica lives; count() = replicas", _REPLICA),
    "async_pmd_scorer_requests_inflight": Spec("gauge", "requests", "score requests in the replica", _REPLICA),
    "async_pmd_scorer_request_seconds": Spec(
        "histogram", "s", "latency of scoring one rollout batch", _REPLICA, _SECONDS),
    "async_pmd_scorer_responses_total": Spec("counter", "responses", "responses scored", _REPLICA),
    "async_pmd_scorer_failures_total": Spec(
        "counter", "responses", "failed reward calls by reason (timeout, exception:<type>, nonfinite, type, crash)",
        _REPLICA + ("reason",)),
    # buffer
    "async_pmd_buffer_groups_held": Spec(
        "gauge", "groups", "buffer depth: complete groups waiting for the learner"),
    "async_pmd_buffer_groups_total": Spec(
        "counter", "groups", "groups settled by outcome (trained, filtered = band, stale, failed, duplicate, malformed)",
        ("outcome",)),
    "async_pmd_buffer_staleness_steps": Spec(
        "histogram", "learner steps", "staleness of each trained group (learner step - policy version)", (),
        _STEPS),
    "async_pmd_buffer_put_waits_total": Spec(
        "counter", "puts", "puts that waited for room (backpressure at the buffer)"),
    # driver
    "async_pmd_driver_requests_inflight": Spec("gauge", "requests", "generation requests in flight"),
    "async_pmd_driver_groups_unsettled": Spec(
        "gauge", "groups",
        "dispatched groups not yet trained/filtered/stale/failed (generating, scoring or held)"),
    "async_pmd_driver_groups_dispatched_total": Spec(
        "counter", "groups", "groups dispatched (a re-issued request is not counted again)"),
    "async_pmd_driver_groups_failed_total": Spec("counter", "groups", "groups whose request failed for good"),
    "async_pmd_driver_retries_total": Spec(
        "counter", "requests", "requests re-issued after a replica died or timed out"),
    "async_pmd_driver_backpressure_waits_total": Spec(
        "counter", "waits", "dispatch refused for staleness or buffer room"),
    # driver, with generator.partial_rollout.enable (metrics.jsonl `partial/<x>`)
    "async_pmd_driver_partial_segments_total": Spec(
        "counter", "segments", "response segments received (partial rollouts)"),
    "async_pmd_driver_partial_continued_segments_total": Spec(
        "counter", "segments", "segments that continued a response begun in an earlier request"),
    "async_pmd_driver_partial_completed_groups_total": Spec(
        "counter", "groups", "groups whose every response finished, sent on to be scored"),
    "async_pmd_driver_partial_restarts_total": Spec(
        "counter", "responses", "begun responses sampled again: their first segment grew too stale"),
    "async_pmd_driver_partial_open_groups": Spec("gauge", "groups", "groups with responses still being sampled"),
    "async_pmd_driver_partial_queued_rows": Spec("gauge", "rows", "unfinished responses waiting for a request"),
    # actor: the learner ranks (one series per rank). A gauge `async_pmd_actor_<x>` is the
    # step's `actor/<x>` of metrics.jsonl (rank-local; the jsonl holds the mean over ranks).
    "async_pmd_actor_step": Spec("gauge", "steps", "learner steps applied (metrics.jsonl `step`)", _RANK),
    "async_pmd_actor_step_seconds": Spec(
        "histogram", "s", "one learner step on this rank: decode, forward, backward, optimizer "
        "(metrics.jsonl `timing/train_s`)", _RANK, _SECONDS),
    "async_pmd_actor_loss": Spec("gauge", "1", "policy loss of the step", _RANK),
    "async_pmd_actor_pmd_kl": Spec("gauge", "nats", "opmd: KL estimate to the behaviour policy", _RANK),
    "async_pmd_actor_ppo_kl": Spec("gauge", "nats", "vanilla: KL estimate to the behaviour policy", _RANK),
    "async_pmd_actor_grad_norm": Spec("gauge", "1", "global grad norm before clipping", _RANK),
    "async_pmd_actor_partition_weight_mean": Spec(
        "gauge", "1", "mean partition weight of the trained rows", _RANK),
    "async_pmd_actor_entropy": Spec("gauge", "nats", "mean token entropy of the responses", _RANK),
    "async_pmd_actor_lr": Spec("gauge", "1", "learning rate of the step", _RANK),
    "async_pmd_actor_reward_mean": Spec(
        "gauge", "reward", "mean reward of the trained batch (metrics.jsonl `reward/mean`)", _RANK),
    "async_pmd_actor_reward_std": Spec(
        "gauge", "reward", "reward std of the trained batch (metrics.jsonl `reward/std`)", _RANK),
    "async_pmd_actor_weight_publish_seconds": Spec(
        "histogram", "s", "gather full weights + store them, rank 0 (metrics.jsonl `timing/weight_publish_s`)",
        _RANK, _SECONDS),
    "async_pmd_actor_weight_broadcast_seconds": Spec(
        "histogram", "s", "`weight_sync.transport: collective`: one broadcast of all weights to one replica, rank 0",
        _RANK, _SECONDS),
    # weight store
    "async_pmd_weights_version": Spec("gauge", "version", "newest published policy version"),
    # validation (the trainer, every trainer.test_freq steps; see async_pmd.validation)
    "async_pmd_val_reward_mean": Spec(
        "gauge", "reward", "latest validation: mean reward over the held-out prompts' responses"),
    "async_pmd_val_pass_at_n": Spec(
        "gauge", "1", "latest validation: share of held-out prompts with a full-marks response among n"),
    "async_pmd_val_mean_at_n": Spec(
        "gauge", "reward", "latest validation: mean over held-out prompts of their n responses' mean reward"),
}

# The step metrics `actor/<x>` that are also gauges `async_pmd_actor_<x>` (one name, two places).
ACTOR_GAUGES = ("loss", "pmd_kl", "ppo_kl", "grad_norm", "partition_weight_mean", "entropy", "lr")


def _ray_name(name: str, spec: Spec) -> str:
    # Ray appends `_total` to counters itself.
    return name.removesuffix("_total") if spec.kind == "counter" else name


class RoleMetrics:
    """The metrics of one role (`generator`, `buffer`, ...) in one actor, with its fixed tags.

    `name` arguments are short: `"tokens_total"` means `async_pmd_<role>_tokens_total`. Ray
    metric objects are created on first use. A gauge keeps its last value until set again (a
    daemon thread re-records it every `refresh_s`; None = never, for tests) and disappears with
    the process. Not thread-safe for `inflight` and `sync` (call them from the actor's event
    loop); `set`, `inc` and `observe` may be called from any thread.
    """

    def __init__(self, role: str, *, refresh_s: float | None = GAUGE_REFRESH_S, **tags: str):
        self.role = role
        self._tags = {k: str(v) for k, v in tags.items()}
        self._metrics: dict = {}
        self._totals: dict[tuple, float] = {}  # last cumulative value seen by `sync`
        self._gauges: dict[tuple, tuple[str, float, dict]] = {}  # last value of each gauge series
        self._lock = threading.Lock()  # guards _metrics and _gauges (worker threads record too)
        self._refresh_s = refresh_s
        self._refresher: threading.Thread | None = None
        self._inflight = 0
        self._last_export = 0.0

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value > 0:
            self._get(name).inc(value, tags=self._merge(tags))

    def set(self, name: str, value: float, **tags: str) -> None:
        tags, gauge = self._merge(tags), self._get(name)
        with self._lock:  # so the refresher never re-records an older value over this one
            gauge.set(float(value), tags=tags)
            self._gauges[(name, *sorted(tags.items()))] = (name, float(value), tags)
            if self._refresher is None and self._refresh_s:
                self._refresher = threading.Thread(target=self._refresh, name=f"{self.role}-gauges", daemon=True)
                self._refresher.start()

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._get(name).observe(float(value), tags=self._merge(tags))

    def sync(self, totals: Mapping[str, float], **tags: str) -> None:
        """Counters from cumulative totals (`{"retries_total": 7}`): increments by what changed."""
        for name, total in totals.items():
            key = (name, tuple(sorted(tags.items())))
            delta = float(total) - self._totals.get(key, 0.0)
            self._totals[key] = float(total)
            self.inc(name, delta, **tags)

    def inflight(self, delta: int) -> None:
        self._inflight += delta
        self.set("requests_inflight", self._inflight)

    def due(self, interval_s: float = 0.5) -> bool:
        """True at most once per `interval_s`: for exports from loops that spin faster than that."""
        now = time.monotonic()
        if now - self._last_export < interval_s:
            return False
        self._last_export = now
        return True

    def _merge(self, tags: dict[str, str]) -> dict[str, str]:
        return {**self._tags, **{k: str(v) for k, v in tags.items()}} if tags else self._tags

    def _get(self, name: str):
        with self._lock:
            metric = self._metrics.get(name)
            if metric is None:
                metric = self._metrics[name] = create(f"{PREFIX}{self.role}_{name}")
            return metric

    def _refresh(self) -> None:
        import ray

        while True:
            time.sleep(self._refresh_s)
            if not ray.is_initialized():  # a driver process (the trainer) after ray.shutdown()
                return
            with self._lock:
                for name, value, tags in self._gauges.values():
                    self._metrics[name].set(value, tags=tags)


def create(name: str):
    """The Ray metric object for `name` (a key of METRICS)."""
    from ray.util import metrics

    spec = METRICS[name]
    kwargs = {"description": f"{spec.help} [{spec.unit}]", "tag_keys": spec.labels}
    if spec.kind == "counter":
        return metrics.Counter(_ray_name(name, spec), **kwargs)
    if spec.kind == "gauge":
        return metrics.Gauge(name, **kwargs)
    return metrics.Histogram(name, boundaries=list(spec.buckets), **kwargs)


def tracked(method):
    """Decorate an async service method: `requests_inflight` and `request_seconds` of the
    instance's `self._metrics`, recorded also when the call raises."""

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        metrics: RoleMetrics = self._metrics
        metrics.inflight(+1)
        start = time.perf_counter()
        try:
            return await method(self, *args, **kwargs)
        finally:
            metrics.observe("request_seconds", time.perf_counter() - start)
            metrics.inflight(-1)

    return wrapper


def record_learner_step(metrics: RoleMetrics, step_metrics: Mapping[str, float], rewards,
                        learner_step: int, step_s: float) -> None:
    """The actor gauges of one step: `step_metrics` from `pmd_step.train_on_batch`, `rewards` float[B]."""
    for name in ACTOR_GAUGES:
        if f"actor/{name}" in step_metrics:
            metrics.set(name, step_metrics[f"actor/{name}"])
    metrics.set("reward_mean", float(rewards.mean()))
    metrics.set("reward_std", float(rewards.std()))
    metrics.set("step", learner_step + 1)
    metrics.observe("step_seconds", step_s)
