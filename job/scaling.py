"""Scaler: change the replica count of a running job's generator or scorer deployment in place.

Used by `python -m async_pmd.scale` from a process that has joined the job's Ray. The count is
set through the Serve controller's `update_deployment_replicas`, the call behind Serve's public
REST route `POST /api/v1/applications/{app}/deployments/{dep}/scale` (which needs the dashboard;
the embedded job runs without one). It is allowed because the job deploys both apps with
`external_scaler_enabled=True` (generators: unless they autoscale). Unlike a second `serve.run`,
it keeps the running replicas: a scale-up only adds replicas (each pulls the newest weights in
`__init__`, before Serve routes to it), and a scale-down lets Serve remove the newest replicas
from routing and drain their requests (`graceful_shutdown_timeout_s`) before stopping them.
The controller method is private API of Ray 2.60 (pinned); tests/services/test_scaling.py covers it.
"""

from __future__ import annotations

import time

import ray
from ray import serve
from ray.serve._private.common import DeploymentID
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

from async_pmd import names

# CLI role -> (Serve app, deployment)
ROLES = {"generators": (names.GENERATOR_APP, names.GENERATOR_DEPLOYMENT),
         "scorers": (names.SCORER_APP, names.SCORER_DEPLOYMENT)}
_POLL_S = 0.5


class ScaleError(RuntimeError):
    """The request cannot be carried out; the message says what to change."""


def _controller():
    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


def _deployments() -> dict[str, dict]:
    """Role -> the controller's details of its deployment (Serve's `DeploymentDetails` as a
    dict), for the roles deployed."""
    apps = ray.get(_controller().get_serve_instance_details.remote())["applications"]
    return {role: apps[app]["deployments"][name] for role, (app, name) in ROLES.items()
            if name in apps.get(app, {}).get("deployments", {})}


def deployed_roles() -> list[str]:
    """The roles the job deployed (no scorers when the generators score: `scorer.inline_builtin`);
    ScaleError when there are no generators (no job)."""
    roles = list(_deployments())
    if "generators" not in roles:
        deployment("generators")
    return roles


def deployment(role: str) -> dict:
    try:
        return _deployments()[role]
    except KeyError:
        app, name = ROLES[role]
        hint = (" (or the generators score the reward themselves: a pure-string built-in with "
                "scorer.inline_builtin, so there is no scorer to scale)" if role == "scorers" else "")
        raise ScaleError(f"no Serve deployment {app}/{name} in this Ray: is the job running?{hint}") from None


def replicas(role: str, with_status: bool = True) -> list[dict]:
    """Live replicas of `role`: replica_id, state, pid, node_id, start_time_s, and with `with_status` the
    replica's own `status()` (RUNNING replicas only), oldest first."""
    rows = [{"replica_id": r["replica_id"], "state": getattr(r["state"], "value", r["state"]), "pid": r.get("pid"),
             "node_id": r.get("node_id"),
             "start_time_s": r["start_time_s"]} for r in deployment(role)["replicas"]]
    if with_status and any(r["state"] == "RUNNING" for r in rows):
        app, name = ROLES[role]
        statuses = serve.get_deployment_handle(name, app_name=app).broadcast("status").results(
            timeout_s=60, return_exceptions=True)
        by_pid = {s["pid"]: s for s in statuses if isinstance(s, dict)}
        for r in rows:
            r["status"] = by_pid.get(r["pid"])
    return sorted(rows, key=lambda r: r["start_time_s"])


def published_version(namespace: str) -> int:
    """The WeightStore's newest version (-1 before the first publish)."""
    return ray.get(ray.get_actor(names.WEIGHT_STORE, namespace=namespace).version.remote())


def scale(role: str, num_replicas: int, *, timeout_s: float = 120.0, allow_pending: bool = False) -> dict:
    """Set `role`'s replica count to `num_replicas` and wait until exactly that many run.

    Returns {"before": [...], "after": [...]} (see `replicas`). Raises ScaleError if the app
    autoscales, if the cluster lacks the CPUs for the new replicas (unless `allow_pending`, e.g.
    on a cluster whose autoscaler adds nodes), or if the count is not reached in `timeout_s`.
    """
    if num_replicas < 1:
        raise ScaleError("the job needs at least 1 replica of each role")
    app, name = ROLES[role]
    before = replicas(role, with_status=False)
    if not allow_pending:
        _check_resources(role, num_replicas - len(before))
    try:
        ray.get(_controller().update_deployment_replicas.remote(DeploymentID(name=name, app_name=app), num_replicas))
    except ray.exceptions.RayTaskError as exc:
        if "ExternalScalerDisabledError" in str(exc) or "external_scaler_enabled" in str(exc):
            raise ScaleError(f"{role} autoscale in this job (generator.autoscaling is set): Serve sets their "
                             "count between min_replicas and max_replicas; restart without it to scale by hand") from None
        raise
    _wait_for(role, num_replicas, timeout_s)
    return {"before": before, "after": replicas(role)}


def _check_resources(role: str, added: int) -> None:
    if added <= 0:
        return
    options = deployment(role)["deployment_config"].get("ray_actor_options") or {}
    need = added * float(options.get("num_cpus", 1.0))
    free = ray.available_resources().get("CPU", 0.0)
    if need > free + 1e-6:
        raise ScaleError(
            f"{added} more {role} need {need:g} CPUs (num_cpus {options.get('num_cpus', 1.0):g} each) and the "
            f"job's Ray has {free:g} free: Serve would leave them pending. Start the job with more logical "
            f"CPUs (ray.num_cpus=N) or smaller replicas (generator.num_cpus), or pass --allow-pending")


def _wait_for(role: str, num_replicas: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        states = [r["state"] for r in replicas(role, with_status=False)]
        if len(states) == num_replicas and all(s == "RUNNING" for s in states):
            return
        if time.monotonic() > deadline:
            raise ScaleError(f"{role}: {num_replicas} replicas requested, after {timeout_s:g} s: {states}")
        time.sleep(_POLL_S)
