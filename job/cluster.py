"""Start a private local Ray, or join a cluster, for one job.

A private Ray binds GCS, raylet, agents and the metrics port to the node IP, which is 127.0.0.1
only when `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is set before Ray is imported (`async_pmd.launch`
sets it); `job.loopback` moves the one listener that ignores the node IP. The dashboard is off.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from async_pmd.config import ClusterConfig
from job import loopback

logger = logging.getLogger(__name__)

# A private Ray started right after a killed run can time out while the old instance's agents
# are still exiting (~20 s here): try again after these waits.
_START_RETRY_WAITS_S = (5.0, 10.0, 20.0)
_RESOURCE_REPORT_S = 30.0  # how often a job waiting for an autoscaling cluster says what it lacks

# Every actor of the job gets these: no hub access, quiet tokenizers, and idle OpenMP threads
# that sleep instead of spinning on cores the other actors need.
_WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_WAIT_POLICY": "PASSIVE"}


def worker_env(cfg: ClusterConfig) -> dict[str, str]:
    """`_WORKER_ENV`, and the largest message a Serve replica's gRPC server and its callers take:
    the driver's requests go there (`services.driver.direct_handle`) and Serve's default is 4 MiB, below
    a batch of long responses; so `wire.max_bytes` (with room for the framing) is what refuses."""
    grpc_max = min(cfg.wire.max_bytes + 2**20, 2**31 - 1)
    return {**_WORKER_ENV, "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(grpc_max)}


def init_ray(cfg: ClusterConfig) -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # The worker hook binds Serve's replica gRPC server to the node's address, here and on a cluster.
    kwargs = dict(namespace=cfg.ray.namespace, include_dashboard=False, log_to_driver=True,
                  runtime_env={"env_vars": worker_env(cfg), "worker_process_setup_hook": loopback.SETUP_HOOK})
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
        return
    # Ray prestarts a worker per CPU for tasks the job never runs; they start beside the job's own
    # actors and slow them (launch → first learner step ~3 s longer here, `ops/bench/overhead.py`).
    kwargs["_system_config"] = {"prestart_worker_first_driver": False}
    if cfg.metrics.enabled:
        kwargs["_metrics_export_port"] = cfg.metrics.export_port
        kwargs["_system_config"]["metrics_report_interval_ms"] = 1000
    with_retries(lambda: ray.init(address="local", num_cpus=local_cpus(cfg), _temp_dir=cfg.ray.temp_dir, **kwargs),
                 _START_RETRY_WAITS_S, cleanup=ray.shutdown)
    if ray.util.get_node_ip_address() != "127.0.0.1":
        logger.warning("the private Ray listens on %s, not only 127.0.0.1: Ray was imported before "
                       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set (async_pmd.launch sets it)",
                       ray.util.get_node_ip_address())


def local_cpus(cfg: ClusterConfig) -> int:
    """Logical CPUs for a private Ray: the machine's, or what the reservations need if more."""
    gen = cfg.generator.autoscaling.max_replicas if cfg.generator.autoscaling else cfg.generator.num_replicas
    need = gen * cfg.generator.num_cpus + cfg.learner.num_ranks * cfg.learner.num_cpus_per_rank \
        + (0 if cfg.score_in_generator else cfg.scorer.num_replicas * cfg.scorer.num_cpus)
    return cfg.ray.num_cpus or max(os.cpu_count() or 1, int(need + 0.999))


def with_retries(start: Callable[[], object], waits_s: tuple[float, ...], cleanup: Callable[[], None]) -> None:
    """`start()`, tried again after each wait in `waits_s` if it raises (after `cleanup()`); the
    last failure propagates."""
    for attempt, wait_s in enumerate((*waits_s, None), start=1):
        try:
            start()
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises RuntimeError, ConnectionError, TimeoutError here
            if wait_s is None:
                raise
            logger.warning("starting the private Ray failed (attempt %d: %s); a killed run's processes may still be "
                           "exiting: trying again in %g s", attempt, exc, wait_s)
            cleanup()
            time.sleep(wait_s)


# ---------------------------------------------------------------- resources


class ResourceShortfall(RuntimeError):
    """The cluster cannot hold the job's reservations; the message names each ask and each node."""


@dataclass(frozen=True)
class Ask:
    """One actor's reservation."""

    actor: str
    cpus: float
    gpus: float = 0.0


def asks(cfg: ClusterConfig) -> list[Ask]:
    """What the job reserves, actor by actor (the actors with num_cpus=0 need no room)."""
    gen, sc, lc = cfg.generator, cfg.scorer, cfg.learner
    replicas = (gen.autoscaling.min_replicas or 1) if gen.autoscaling else gen.num_replicas
    scorers = 0 if cfg.score_in_generator else sc.num_replicas  # a string reward: no scorer deployed
    return ([Ask(f"Generator replica {i}", gen.num_cpus, gen.num_gpus) for i in range(replicas)]
            + [Ask(f"RewardScorer replica {i}", sc.num_cpus) for i in range(scorers)]
            + [Ask(f"LearnerRank {r}", lc.num_cpus_per_rank, lc.num_gpus_per_rank) for r in range(lc.num_ranks)])


def shortfall(needs: list[Ask], nodes: list[dict[str, float]]) -> str | None:
    """Why `needs` cannot be placed on `nodes` ({"CPU": .., "GPU": ..} each), or None if they fit.

    First fit, largest first: each actor needs its whole reservation on one node."""
    free = [dict(n) for n in nodes]
    unplaced = []
    for ask in sorted(needs, key=lambda a: (a.gpus, a.cpus), reverse=True):
        node = next((n for n in free if n.get("CPU", 0) + 1e-9 >= ask.cpus and n.get("GPU", 0) + 1e-9 >= ask.gpus), None)
        if node is None:
            unplaced.append(ask)
            continue
        node["CPU"] = node.get("CPU", 0) - ask.cpus
        node["GPU"] = node.get("GPU", 0) - ask.gpus
    if not unplaced:
        return None
    need = "; ".join(f"{a.actor}: {a.cpus:g} CPU" + (f" + {a.gpus:g} GPU" if a.gpus else "") for a in needs)
    have = "; ".join(f"node {i}: {n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for i, n in enumerate(nodes))
    return (f"the cluster cannot hold the job: {len(unplaced)} of {len(needs)} reservations do not fit "
            f"(first: {unplaced[0].actor}). The job asks for {need}. The cluster has {have}. Lower "
            "generator.num_replicas / num_cpus, scorer.num_cpus, learner.num_ranks / num_cpus_per_rank, add nodes, "
            "or set ray.wait_for_resources_s for an autoscaling cluster")


def check_resources(cfg: ClusterConfig) -> None:
    """Before deploying: fail with the shortfall (ResourceShortfall), or on an autoscaling cluster wait
    up to `ray.wait_for_resources_s`, saying what is missing every 30 s."""
    deadline = time.monotonic() + cfg.ray.wait_for_resources_s
    last_report = 0.0
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        why = shortfall(asks(cfg), nodes)
        if why is None:
            return
        if time.monotonic() >= deadline:
            raise ResourceShortfall(why)
        if time.monotonic() - last_report >= _RESOURCE_REPORT_S:
            logger.warning("waiting for the cluster to grow (ray.wait_for_resources_s=%g): %s",
                           cfg.ray.wait_for_resources_s, why)
            last_report = time.monotonic()
        time.sleep(1.0)
