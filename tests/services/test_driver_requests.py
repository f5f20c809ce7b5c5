"""The RolloutDriver's requests to Serve replicas (`services.driver.direct_handle`: the replica's own gRPC
server, not Ray actor calls), on the job's private Ray (`job.cluster.init_ray`) with real Serve:

- an answer over Serve's 4 MiB gRPC default arrives whole (the job raises the limit to
  `wire.max_bytes`);
- an exception the replica raises stays a deterministic failure (not retried), and a replica
  killed mid-request is one the driver re-issues, as with Serve's actor-call transport.

The caller is an actor, as the driver is: the message limit is read in the worker processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest
import ray
from ray import serve

from async_pmd import wire
from async_pmd.config import build_config
from job.cluster import init_ray
from job.deploy import start_serve
from services.driver import direct_handle, _failure_kind

APP = "driver_requests"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4)
class Replica:
    def pid(self) -> int:
        return os.getpid()

    async def zeros(self, nbytes: int) -> np.ndarray:
        return np.zeros(nbytes, dtype=np.uint8)

    async def refuse(self) -> None:
        raise wire.WireError("a malformed request")

    async def hang(self) -> None:
        await asyncio.sleep(60)


@ray.remote(num_cpus=0)
class Caller:
    """Calls the replica through the driver's handle; reports what came back."""

    def __init__(self):
        self._handle = direct_handle(serve.get_deployment_handle("Replica", app_name=APP))

    async def nbytes(self, n: int) -> int:
        return len(await self._handle.zeros.remote(n))

    async def failure(self, method: str) -> tuple[str, str | None]:
        try:
            await asyncio.wait_for(getattr(self._handle, method).remote(), 60)
        except Exception as exc:  # noqa: BLE001 - the test asserts on the type and its kind
            return type(exc).__name__, _failure_kind(exc)
        return "no error", None


@pytest.fixture(scope="module")
def caller():
    init_ray(build_config({}, []))
    try:
        start_serve()
        serve.run(Replica.bind(), name=APP, route_prefix=None)
        yield Caller.remote()
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_an_answer_over_serves_grpc_default_arrives_whole(caller):
    assert ray.get(caller.nbytes.remote(6 * 2**20)) == 6 * 2**20


@pytest.mark.slow
def test_a_replicas_exception_is_deterministic_and_a_killed_replica_is_retried(caller):
    name, kind = ray.get(caller.failure.remote("refuse"))
    assert "WireError" in name and kind is None
    pid = serve.get_deployment_handle("Replica", app_name=APP).pid.remote().result()
    pending = caller.failure.remote("hang")
    ray.get(caller.nbytes.remote(1))  # sent after the hang, answered: the hang has gone out
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    name, kind = ray.get(pending, timeout=90)
    assert name != "no error" and kind == "retry", name


def test_failure_kinds():
    """What the driver retries: a dead or unreachable replica, Serve or Ray failing, a timeout; not
    what the replica's code raised, bare (gRPC) or wrapped (a Ray actor call)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

    wrapped = RayTaskError("generate", "traceback", wire.WireError("bad")).as_instanceof_cause()
    assert [_failure_kind(e) for e in (ActorDiedError(), ActorUnavailableError("gone", None), TimeoutError(),
                                       ConnectionResetError())] == ["retry"] * 4
    assert [_failure_kind(e) for e in (wire.WireError("bad"), ValueError("prompt too long"), wrapped)] == [None] * 3
