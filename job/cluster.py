"""Start a private local Ray, or join a cluster, for one job.

A private Ray binds GCS, raylet, agents and the metrics port to the node IP, which is 127.0.0.1
only when `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is set before Ray is imported (`async_pmd.launch`
sets it); `job.loopback` moves the one listener that ignores the node IP. The dashboard is off.
"""

from __future__ import annotations

import logging
import os

import ray

from async_pmd.config import ClusterConfig
from job import loopback

logger = logging.getLogger(__name__)

# Every actor of the job gets these: no hub access, quiet tokenizers, and idle OpenMP threads
# that sleep instead of spinning on cores the other actors need.
_WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_WAIT_POLICY": "PASSIVE"}


def init_ray(cfg: ClusterConfig) -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    kwargs = dict(namespace=cfg.ray.namespace, include_dashboard=False, log_to_driver=True,
                  runtime_env={"env_vars": dict(_WORKER_ENV)})
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
        return
    if cfg.metrics.enabled:
        kwargs["_metrics_export_port"] = cfg.metrics.export_port
        kwargs["_system_config"] = {"metrics_report_interval_ms": 1000}
    kwargs["runtime_env"]["worker_process_setup_hook"] = loopback.SETUP_HOOK
    ray.init(address="local", num_cpus=local_cpus(cfg), _temp_dir=cfg.ray.temp_dir, **kwargs)
    if ray.util.get_node_ip_address() != "127.0.0.1":
        logger.warning("the private Ray listens on %s, not only 127.0.0.1: Ray was imported before "
                       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set (async_pmd.launch sets it)",
                       ray.util.get_node_ip_address())


def local_cpus(cfg: ClusterConfig) -> int:
    """Logical CPUs for a private Ray: the machine's, or what the reservations need if more."""
    gen = cfg.generator.autoscaling.max_replicas if cfg.generator.autoscaling else cfg.generator.num_replicas
    need = gen * cfg.generator.num_cpus + cfg.learner.num_ranks * cfg.learner.num_cpus_per_rank \
        + cfg.scorer.num_replicas * cfg.scorer.num_cpus
    return cfg.ray.num_cpus or max(os.cpu_count() or 1, int(need + 0.999))
