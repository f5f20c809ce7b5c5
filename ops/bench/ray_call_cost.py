"""What one Ray actor call costs on this machine: the floor under the job's coordination CPU.

    .venv/bin/python ops/bench/ray_call_cost.py [--calls 2000] [--payload-bytes 0 20000] [--system-config JSON] [--serve]

One async actor awaits `--calls` sequential calls of a no-op method on another async actor (as
the RolloutDriver awaits the GroupBuffer), for each payload size; psutil reads both processes'
CPU seconds around the loop. The baseline, measured in the same run, is the same loop awaiting a
local coroutine inside the caller: the cost of the Python around a call without Ray. It also
prints what an idle actor process costs per second (Ray's own threads), the other fixed cost every
actor of the job pays. The job's coordination share (`ops/bench/overhead.py`) is, to first
order, calls per learner step × the per-call CPU here + actors × the idle rate / steps per second.

`--serve` adds the call the RolloutDriver makes most, a request to a Serve deployment through a
handle (a one-replica echo deployment, the job's quiet logging and its worker hook), two ways:
as Serve sends it by default, a streaming Ray actor call (the replica first answers whether it
accepts the request, then the result), and through the replica's own gRPC server
(`_by_reference=False`, `services.driver.direct_handle`, what the driver uses). The callee's CPU is the
replica's process.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import sys
from pathlib import Path

import psutil

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: 127.0.0.1
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402
from ray import serve  # noqa: E402

from job.deploy import _QUIET  # noqa: E402
from job.loopback import SETUP_HOOK  # noqa: E402
from services.driver import direct_handle  # noqa: E402


@serve.deployment(ray_actor_options={"num_cpus": 0}, logging_config=_QUIET)
class Echo:
    async def noop(self, payload=None) -> int:
        return 1

    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0)
class Callee:
    async def noop(self, payload=None) -> int:
        return 1

    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0)
class Caller:
    def __init__(self, callee):
        self._callee = callee

    def pid(self) -> int:
        return os.getpid()

    async def call(self, n: int, payload) -> int:
        for _ in range(n):
            await self._callee.noop.remote(payload)
        return n

    async def serve_call(self, n: int, payload, direct: bool) -> int:
        handle = serve.get_deployment_handle("Echo", app_name="echo")
        handle = direct_handle(handle) if direct else handle
        for _ in range(n):
            await handle.noop.remote(payload)
        return n

    async def local(self, n: int, payload) -> int:
        async def noop(p):
            return 1

        for _ in range(n):
            await noop(payload)
        return n


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--payload-bytes", type=int, nargs="+", default=[0, 20000])
    parser.add_argument("--idle-s", type=float, default=5.0)
    parser.add_argument("--system-config", type=json.loads, default={},
                        help="Ray system config, JSON (e.g. '{\"event_stats\": false}'): what a setting changes per call")
    parser.add_argument("--serve", action="store_true", help="also a Serve request, by actor call and by gRPC")
    args = parser.parse_args()
    shown = json.dumps(args.system_config)  # ray.init adds its own keys to the dict it is given
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             _system_config=args.system_config,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}, "worker_process_setup_hook": SETUP_HOOK})
    callee = Callee.remote()
    caller = Caller.remote(callee)
    caller_p, callee_p = psutil.Process(ray.get(caller.pid.remote())), psutil.Process(ray.get(callee.pid.remote()))
    loops = [("local coroutine (baseline)", caller.local, (), callee_p, False),
             ("actor call", caller.call, (), callee_p, True)]
    if args.serve:
        serve.start(proxy_location="Disabled", logging_config=_QUIET)
        replica = serve.run(Echo.bind(), name="echo", route_prefix=None)
        replica_p = psutil.Process(replica.pid.remote().result())
        loops += [("Serve request by actor call (Serve's default)", caller.serve_call, (False,), replica_p, True),
                  ("Serve request by the replica's gRPC (the driver's)", caller.serve_call, (True,), replica_p, True)]
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; Ray system config {shown}\n")
    print("| loop | payload bytes | wall ms / call | caller CPU ms / call | callee CPU ms / call | both |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in args.payload_bytes:
        payload = b"x" * size if size else None
        for name, method, extra, callee_p, remote in loops:
            ray.get(method.remote(args.calls // 10, payload, *extra))  # warm up
            c0, e0, t0 = _cpu(caller_p), _cpu(callee_p), time.perf_counter()
            ray.get(method.remote(args.calls, payload, *extra))
            wall = time.perf_counter() - t0
            c, e = (_cpu(caller_p) - c0) / args.calls * 1e3, (_cpu(callee_p) - e0) / args.calls * 1e3
            callee_col = f"{e:.3f}" if remote else "–"
            both = c + (e if remote else 0.0)
            print(f"| {name} | {size:,} | {wall / args.calls * 1e3:.3f} | {c:.3f} | {callee_col} | {both:.3f} |")
    callee_p = loops[1][3]
    c0, e0 = _cpu(caller_p), _cpu(callee_p)
    time.sleep(args.idle_s)
    idle = ((_cpu(caller_p) - c0) + (_cpu(callee_p) - e0)) / 2 / args.idle_s * 1e3
    if args.serve:
        serve.shutdown()
    print(f"\nan idle actor process: {idle:.1f} CPU ms per second ({idle / 10:.1f}% of a core)")
    ray.shutdown()


if __name__ == "__main__":
    main()
