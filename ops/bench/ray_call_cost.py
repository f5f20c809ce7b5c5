"""What one Ray actor call costs on this machine: the floor under the job's coordination CPU.

    .venv/bin/python ops/bench/ray_call_cost.py [--calls 2000] [--payload-bytes 0 20000] [--system-config JSON]

One async actor awaits `--calls` sequential calls of a no-op method on another async actor (as
the RolloutDriver awaits the GroupBuffer), for each payload size; psutil reads both processes'
CPU seconds around the loop. The baseline, measured in the same run, is the same loop awaiting a
local coroutine inside the caller: the cost of the Python around a call without Ray. It also
prints what an idle actor process costs per second (Ray's own threads), the other fixed cost every
actor of the job pays. The job's coordination share (`ops/bench/overhead.py`) is, to first
order, calls per learner step × the per-call CPU here + actors × the idle rate / steps per second.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import psutil
import ray

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


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
    args = parser.parse_args()
    shown = json.dumps(args.system_config)  # ray.init adds its own keys to the dict it is given
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             _system_config=args.system_config)
    callee = Callee.remote()
    caller = Caller.remote(callee)
    caller_p, callee_p = psutil.Process(ray.get(caller.pid.remote())), psutil.Process(ray.get(callee.pid.remote()))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; Ray system config {shown}\n")
    print("| loop | payload bytes | wall ms / call | caller CPU ms / call | callee CPU ms / call | both |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in args.payload_bytes:
        payload = b"x" * size if size else None
        for name, method, remote in (("local coroutine (baseline)", caller.local, False),
                                     ("actor call", caller.call, True)):
            ray.get(method.remote(args.calls // 10, payload))  # warm up
            c0, e0, t0 = _cpu(caller_p), _cpu(callee_p), time.perf_counter()
            ray.get(method.remote(args.calls, payload))
            wall = time.perf_counter() - t0
            c, e = (_cpu(caller_p) - c0) / args.calls * 1e3, (_cpu(callee_p) - e0) / args.calls * 1e3
            callee_col = f"{e:.3f}" if remote else "–"
            both = c + (e if remote else 0.0)
            print(f"| {name} | {size:,} | {wall / args.calls * 1e3:.3f} | {c:.3f} | {callee_col} | {both:.3f} |")
    c0, e0 = _cpu(caller_p), _cpu(callee_p)
    time.sleep(args.idle_s)
    idle = ((_cpu(caller_p) - c0) + (_cpu(callee_p) - e0)) / 2 / args.idle_s * 1e3
    print(f"\nan idle actor process: {idle:.1f} CPU ms per second ({idle / 10:.1f}% of a core)")
    ray.shutdown()


if __name__ == "__main__":
    main()
