"""The floor under the coordination share: what it would be if our own code in it cost nothing.

    .venv/bin/python ops/bench/coordination_floor.py [--steps 3000] [--warmup-s 30] [--window-s 60]
        [--rate 25] [--out runs/coordination_floor] [key=value ...]

`ops/bench/overhead.py` measures the coordination actors' share of the job's CPU; this asks how
much of that share is ours to cut. It runs the demo job (`configs/cluster.yaml`, as overhead.py
runs it) and, over `--window-s` seconds that start `--warmup-s` seconds after its first learner
step, reads:

1. every thread of every process of the job (`/proc/<pid>/task/*/stat`): Ray's native threads
   (Ray names them: `worker.io`, the gRPC pollers, the task-event buffer, ...) apart from the
   Python threads (which carry the process's title, `ray::...`, or `python`);
2. py-spy samples (`--rate` a second) of each coordination process's Python threads. A sample is
   ours when the innermost frame that belongs to this repository or to Ray is ours (our logic,
   with the numpy, msgpack and standard library it calls), Ray's or Serve's otherwise.

Per process it prints CPU ms per learner step, the part in Ray's native threads, the share of
the Python samples that were ours (and the functions most sampled), and an upper bound on our code's CPU: that share times the
process's whole CPU (native threads never run our code). Then the coordination share as
measured over the window, and the floor: the same share with that upper bound taken out of both
coordination and the job's total. The floor is what is left of coordination for the calls the
job makes and the processes it keeps, with our code at zero.

py-spy reads the processes without stopping them (`--nonblocking`) but takes some CPU of its
own: speed figures come from overhead.py, not from this run. py-spy is in the test extras.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import COORDINATION, REPO, job_command, job_processes  # noqa: E402

OUR_DIRS = ("async_pmd/", "services/", "job/")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name, user + system CPU seconds) of one process."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def is_python_thread(name: str) -> bool:
    """Python's threads keep the name of the thread that made them: the process title or `python`."""
    return name.startswith("ray::") or name.startswith("python")


def frame_path(frame: str) -> str:
    """The file of a py-spy raw frame, `func (path:line)`."""
    return frame[frame.find("(") + 1:frame.rfind(":")] if "(" in frame else ""


def ours_share(raw: Path) -> tuple[int, int, Counter]:
    """(samples, samples that were ours, ours by function) of a py-spy raw profile."""
    total = ours = 0
    where: Counter = Counter()
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        n = int(count)
        total += n
        owner = None
        for frame in stack.split(";"):
            path = frame_path(frame)
            if path.startswith(OUR_DIRS) or str(REPO) in path:
                owner = f"{frame.split(' (')[0]} ({path.removeprefix(str(REPO) + '/')})"
            elif path.startswith("ray/") or "/ray/" in path:
                owner = None
        if owner is not None:
            ours += n
            where[owner] += n
    return total, ours, where


def steps_done(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="the job's steps: enough to outlast the window")
    parser.add_argument("--warmup-s", type=float, default=30.0)
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--rate", type=int, default=25, help="py-spy samples a second")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "coordination_floor")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(py_spy, os.X_OK):
        sys.exit("py-spy not found: .venv/bin/pip install py-spy (it is in the test extras)")
    from async_pmd.config import load_config
    from async_pmd.models import ensure_tiny_model

    out = args.out.resolve()
    cfg = load_config(REPO / "configs" / "cluster.yaml", [f"model.path={out / 'model'}", *args.overrides])
    ensure_tiny_model(cfg.model.path, **cfg.model.tiny.model_dump())
    cmd, run_dir = job_command(out, args.steps, args.overrides)
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "job.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            while steps_done(metrics) == 0:
                if proc.poll() is not None:
                    sys.exit(f"the job ended before its first step (exit {proc.returncode}); see {out / 'job.log'}")
                time.sleep(0.2)
            time.sleep(args.warmup_s)
            roles = {p.pid: role for p, role, _ in job_processes(proc.pid)}
            before = {pid: thread_cpu(pid) for pid in roles}
            step0 = steps_done(metrics)
            spies = {pid: subprocess.Popen(
                [py_spy, "record", "-p", str(pid), "-r", str(args.rate), "-d", str(int(args.window_s)),
                 "-f", "raw", "-o", str(out / f"{role}_{pid}.txt"), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for pid, role in roles.items() if role in COORDINATION}
            time.sleep(args.window_s)
            after = {pid: thread_cpu(pid) for pid in roles}
            steps = steps_done(metrics) - step0
            for spy in spies.values():
                spy.wait(timeout=60)
            if proc.poll() is not None:
                sys.exit(f"the job ended inside the window (exit {proc.returncode}): raise --steps")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the job drains and stops (README "Stopping")
                proc.wait(timeout=120)
    report(roles, before, after, {pid: out / f"{roles[pid]}_{pid}.txt" for pid in spies}, max(steps, 1), args)


def report(roles, before, after, profiles, steps, args) -> None:
    by_role: dict[str, dict[str, float]] = {}
    for pid, role in roles.items():
        row = by_role.setdefault(role, {"cpu": 0.0, "native": 0.0, "samples": 0, "ours_samples": 0, "ours_cpu": 0.0,
                                        "where": Counter()})
        cpu = native = 0.0
        for tid, (name, seconds) in after.get(pid, {}).items():
            used = seconds - before.get(pid, {}).get(tid, (name, 0.0))[1]
            cpu += used
            native += 0.0 if is_python_thread(name) else used
        row["cpu"] += cpu
        row["native"] += native
        if pid in profiles and profiles[pid].is_file():
            total, ours, where = ours_share(profiles[pid])
            row["where"].update(where)
            row["samples"] += total
            row["ours_samples"] += ours
            row["ours_cpu"] += cpu * ours / total if total else 0.0
    job_cpu = sum(r["cpu"] for r in by_role.values())
    print(f"\nwindow {args.window_s:g} s, {steps} learner steps, CPU of all the job's processes {job_cpu:.1f} s, "
          f"py-spy at {args.rate}/s\n")
    print("| process (role) | CPU ms / learner step | of it in Ray's native threads | Python samples | "
          "of them ours | our code's CPU ms / step (at most) |")
    print("|---|---:|---:|---:|---:|---:|")
    for role, r in sorted(by_role.items(), key=lambda kv: -kv[1]["cpu"]):
        if role in COORDINATION:
            share = r["ours_samples"] / r["samples"] if r["samples"] else 0.0
            print(f"| {role} | {r['cpu'] / steps * 1e3:.1f} | {r['native'] / max(r['cpu'], 1e-9):.0%} | "
                  f"{r['samples']} | {share:.0%} | {r['ours_cpu'] / steps * 1e3:.1f} |")
        else:
            print(f"| {role} | {r['cpu'] / steps * 1e3:.1f} | {r['native'] / max(r['cpu'], 1e-9):.0%} | – | – | – |")
    print("\nour code's samples, by function (the most sampled three of each coordination process):")
    for role, r in by_role.items():
        if role in COORDINATION and r["where"]:
            print(f"  {role}: " + ", ".join(f"{name} {n}" for name, n in r["where"].most_common(3)))
    coord = sum(r["cpu"] for role, r in by_role.items() if role in COORDINATION)
    ours = sum(r["ours_cpu"] for role, r in by_role.items() if role in COORDINATION)
    floor = (coord - ours) / (job_cpu - ours) if job_cpu > ours else float("nan")
    print(f"\ncoordination over the window: {coord / job_cpu:.1%} of the job's CPU "
          f"({coord / steps * 1e3:.1f} CPU ms a step); our code in it at most {ours / steps * 1e3:.1f} ms a step")
    print(f"floor (our code in coordination at zero): {floor:.1%} of the job's CPU")


if __name__ == "__main__":
    main()
