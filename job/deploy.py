"""Build the job's actors in dependency order, restore them from a checkpoint, and stop them.

    WeightStore → GroupBuffer → RolloutDriver (built) → LearnerGroup (restored, then publishes
    its weights) → Generator and RewardScorer deployments (pull those weights in __init__) →
    the driver's `run()`

(no RewardScorer when the generators score a pure-string reward: `ClusterConfig.score_in_generator`)

A fresh run starts Serve's controller before the other actors, then deploys the Serve apps while
the learner ranks start (both take seconds, mostly imports): the generators then begin on
`model.path`, which is version 0 itself. A resumed run keeps the order, so that its replicas
start on the checkpoint's weights.

Each actor receives the typed config sections it uses, cut from the config the launcher
validated; nothing is validated again in another process.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import serve

from async_pmd import checkpoint, names
from async_pmd.config import ClusterConfig
from services.buffer import GroupBuffer
from services.driver import RolloutDriver
from services.generator import Generator
from services.learner import LearnerGroup
from services.scorer import RewardScorer
from services.weights import WeightStore

logger = logging.getLogger(__name__)

_NAME_FREE_S = 30.0  # how long a killed named actor may take to release its name
# Per-request access logs would flood the console at hundreds of requests a second.
_QUIET = {"log_level": "WARNING", "enable_access_log": False}


@dataclass
class Services:
    """Handles on the actors that hold run state (the Serve apps are found by name)."""

    store: ray.actor.ActorHandle
    buffer: ray.actor.ActorHandle
    learners: LearnerGroup
    driver: ray.actor.ActorHandle
    driver_run: ray.ObjectRef
    """The driver's long-lived `run()`; ready only when the driver stopped (or failed)."""


@dataclass(frozen=True)
class Restored:
    """What a checkpoint hands back to the loop."""

    step: int
    elapsed_s: float


def start_services(cfg: ClusterConfig, pad_token_id: int, resume_from: Path | None) -> tuple[Services, Restored]:
    """The actors of a run, restored from `resume_from` when given; Serve apps are (re)deployed."""
    ns = cfg.ray.namespace
    began, phases = time.monotonic(), {}  # where start-up's seconds go, logged once all is up
    with ThreadPoolExecutor(2) as pool:
        # Serve's controller starts first: the generator replicas, the slowest to be ready, wait
        # on it, and the other actors' start-up would delay it.
        controller = pool.submit(start_serve)
        store = WeightStore.options(name=names.WEIGHT_STORE, namespace=ns).remote()
        buffer = GroupBuffer.options(name=names.BUFFER, namespace=ns).remote(
            algorithm=cfg.algorithm, buffer=cfg.buffer, group_size=cfg.generator.n, pad_token_id=pad_token_id,
            max_wire_bytes=cfg.wire.max_bytes)
        # The driver's process (tokenizer, prompt source) starts beside the learner ranks and Serve.
        driver = RolloutDriver.options(name=names.DRIVER, namespace=ns).remote(
            data=cfg.data, generator=cfg.generator, buffer=cfg.buffer, driver=cfg.driver, model_path=cfg.model.path,
            namespace=ns, seed=cfg.trainer.seed, scored_by_generator=cfg.score_in_generator)
        starting = pool.submit(LearnerGroup, cfg)
        controller.result()
        phases["Serve's controller up"] = time.monotonic() - began
        if resume_from is None:
            deploy_serve(cfg)
            phases["the Serve apps running (replicas loaded)"] = time.monotonic() - began
        learners = starting.result()
        phases["learner ranks ready"] = time.monotonic() - began
    restored, state = Restored(0, 0.0), None
    if resume_from is not None:
        state = checkpoint.read_state(resume_from)
        learners.load(str(resume_from / "learner"))
        ray.get(buffer.load_state_dict.remote(state["driver"]["buffer"]))
        restored = Restored(int(state["step"]), float(state.get("elapsed_s", 0.0)))
        logger.info("resumed from %s at step %d", resume_from, restored.step)
    learners.publish(restored.step)
    if resume_from is not None:
        deploy_serve(cfg)
        phases["the Serve apps running (replicas loaded)"] = time.monotonic() - began
    if state is not None:
        ray.get(driver.load_state_dict.remote(state["driver"]))
    logger.info("services up in %.1f s: %s", time.monotonic() - began,
                ", ".join(f"{name} at {s:.1f} s" for name, s in phases.items()))
    return Services(store, buffer, learners, driver, driver.run.remote()), restored


def start_serve() -> None:
    """Serve's controller, without an HTTP proxy (requests come by handle)."""
    serve.start(proxy_location="Disabled", logging_config=_QUIET)


def deploy_serve(cfg: ClusterConfig) -> None:
    """The Serve apps, on the controller `start_serve` started."""
    gen = cfg.generator
    scaling = ({"num_replicas": "auto", "autoscaling_config": gen.autoscaling.model_dump()}
               if gen.autoscaling else {"num_replicas": gen.num_replicas})
    generator = Generator.options(
        ray_actor_options={"num_cpus": gen.num_cpus, "num_gpus": gen.num_gpus},
        max_ongoing_requests=gen.max_ongoing_requests, graceful_shutdown_timeout_s=gen.graceful_shutdown_timeout_s,
        health_check_period_s=gen.health_check_period_s, logging_config=_QUIET, **scaling,
    ).bind(generator=gen, model=cfg.model, max_prompt_length=cfg.data.max_prompt_length, namespace=cfg.ray.namespace,
           weight_sync=cfg.weight_sync, max_wire_bytes=cfg.wire.max_bytes,
           **({"scorer": cfg.scorer, "max_resp_len": cfg.max_resp_len} if cfg.score_in_generator else {}))
    # The external scaler lets `python -m async_pmd.scale` change replica counts in place.
    targets = [serve.RunTarget(generator, name=names.GENERATOR_APP, route_prefix=None,
                               external_scaler_enabled=not gen.autoscaling)]
    if not cfg.score_in_generator:  # the generators score a pure-string reward themselves
        scorer = RewardScorer.options(
            num_replicas=cfg.scorer.num_replicas, ray_actor_options={"num_cpus": cfg.scorer.num_cpus},
            max_ongoing_requests=cfg.scorer.max_ongoing_requests, logging_config=_QUIET,
        ).bind(scorer=cfg.scorer, max_resp_len=cfg.max_resp_len, max_wire_bytes=cfg.wire.max_bytes,
               inline=cfg.scorer_inline)
        targets.append(serve.RunTarget(scorer, name=names.SCORER_APP, route_prefix=None, external_scaler_enabled=True))
    serve.run_many(targets)  # both apps at once: their replicas start side by side


def generator_handle():
    return serve.get_deployment_handle(names.GENERATOR_DEPLOYMENT, app_name=names.GENERATOR_APP)


def scorer_handle():
    return serve.get_deployment_handle(names.SCORER_DEPLOYMENT, app_name=names.SCORER_APP)


def stop_services(services: Services, namespace: str) -> None:
    """Kill the actors `start_services` made; the driver first, so nothing more reaches the buffer."""
    ray.kill(services.driver)
    services.learners.shutdown()
    ray.kill(services.buffer)
    ray.kill(services.store)
    for name in (names.DRIVER, names.BUFFER, names.WEIGHT_STORE):
        _wait_until_unnamed(name, namespace)


def _wait_until_unnamed(name: str, namespace: str) -> None:
    """Block until a killed named actor has released its name, so a new one can take it."""
    deadline = time.monotonic() + _NAME_FREE_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.1)
    raise RuntimeError(f"actor {name!r} still holds its name {_NAME_FREE_S:g}s after it was killed")
