"""`python -m async_pmd.scale --run-dir runs/<exp> generators 3`: change a running job's replica count.

    python -m async_pmd.scale --run-dir runs/<exp> generators N   # or: scorers N
    python -m async_pmd.scale --run-dir runs/<exp> status         # replicas, pids, policy versions

The job writes its Ray address to `<run_dir>/ray_address` and its resolved config (with the Ray
namespace) to `<run_dir>/config.yaml`; `--address` / `--namespace` override them (e.g. for a job
on a cluster). Replicas that are serving keep running: see `job/scaling.py` for how. The
command returns once exactly N replicas run, and prints each replica (pid, the version it started
on, the version it serves).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m async_pmd.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="the job's run directory (trainer.output_dir/experiment_name)")
    parser.add_argument("--address", help="the job's Ray GCS address (default: <run-dir>/ray_address)")
    parser.add_argument("--namespace", help="the job's Ray namespace (default: ray.namespace of <run-dir>/config.yaml)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="how long to wait for the new count")
    parser.add_argument("--allow-pending", action="store_true",
                        help="scale up even if the cluster lacks the CPUs now (an autoscaling cluster adds nodes)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("role", choices=["generators", "scorers", "status"])
    parser.add_argument("num_replicas", type=int, nargs="?", help="the new replica count")
    args = parser.parse_args(argv)
    if (args.role == "status") != (args.num_replicas is None):
        parser.error("give N for generators/scorers, and none for status")
    if args.address is None and args.run_dir is None:
        parser.error("give --run-dir (or --address)")
    return args


def resolve(args: argparse.Namespace) -> tuple[str, str]:
    """(Ray address, namespace) of the job."""
    address, namespace = args.address, args.namespace
    if args.run_dir is not None:
        if address is None:
            path = args.run_dir / "ray_address"
            if not path.is_file():
                raise SystemExit(f"error: {path} not found: is a job running with trainer.run_dir={args.run_dir}?")
            address = path.read_text().strip()
        if namespace is None and (args.run_dir / "config.yaml").is_file():
            namespace = yaml.safe_load((args.run_dir / "config.yaml").read_text())["ray"]["namespace"]
    return address, namespace or "async_pmd"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    address, namespace = resolve(args)
    # Like the job: Ray's node address is 127.0.0.1 only with this set, and the job's Ray is there.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # A local Ray turns token authentication on by itself; a joining driver sends the token
    # (~/.ray/auth_token) only when told to.
    if (Path.home() / ".ray" / "auth_token").is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from job import scaling  # the job package, loaded only when the command runs

    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as exc:
        print(f"error: cannot reach the job's Ray at {address}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.role == "status":
            result = {role: scaling.replicas(role) for role in scaling.deployed_roles()}
        else:
            result = {args.role: scaling.scale(args.role, args.num_replicas, timeout_s=args.timeout_s,
                                               allow_pending=args.allow_pending)["after"]}
        result["published_version"] = scaling.published_version(namespace)
    except scaling.ScaleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    print(json.dumps(result, indent=1, default=str) if args.json else _table(result))
    return 0


def _table(result: dict) -> str:
    lines = [f"published weights: version {result['published_version']}"]
    for role in ("generators", "scorers"):
        for r in result.get(role, []):
            s = r.get("status") or {}
            version = f"  started on v{s['start_version']}, serves v{s['policy_version']}" if "start_version" in s else ""
            lines.append(f"{role:<10} {r['replica_id']:<10} {r['state']:<9} pid {r['pid']}{version}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
