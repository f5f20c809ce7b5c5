"""Where the CPU goes: the demo job against a single-process reference loop, in one run.

    .venv/bin/python ops/bench/overhead.py [--steps 3000] [--ref-steps 3000] [--ref-threads 2]
        [--out runs/overhead] [--sample-s 0.5] [key=value ...]

1. **Reference** (the physical limit on this box): the same model, task, batch, sampler,
   advantages, loss and optimizer in one plain process, no Ray and no DeepSpeed: prompts from the
   same source → the `TorchEngine` sampler on the very module being trained (no weight copy) →
   the built-in reward inline → `GroupStore` (advantages, weights) → `pmd_step.train_on_batch` on
   a plain `torch.optim.AdamW` with the same grad clip. `--ref-threads` torch threads (2: the box).
2. **The job**: `python -m async_pmd.launch configs/cluster.yaml` for `--steps` steps, while this
   script reads every process of the job's process tree every `--sample-s` seconds (psutil) and
   keeps each one's last CPU seconds, named by role (Ray titles actor processes `ray::<Class>`,
   Serve replicas `ray::ServeReplica:<app>:<Deployment>`; a pebble reward worker is a child of its
   scorer replica and counts as the scorer).

It prints the per-process CPU table (CPU seconds, share of the job's CPU, share of one core over
the wall time, ms of CPU per learner step), the per-step timings (train, publish and wait from
`metrics.jsonl`; generate and pull from the replica's counters), start-up (launch → first learner
step, and per process when it appeared and the CPU it used until then), and the comparison:
trained samples/s and seconds / samples to a smoothed reward of `--target`, the job against the
reference. `summary.json` in `--out` holds the same figures.
Extra `key=value` arguments go to both the job and the reference's config.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
# As the job's actors have it (job/cluster.py): idle OpenMP threads sleep instead of spinning, or
# the reference's second thread spins on a core that another process needs (read once, at load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Roles that coordinate rather than generate or train (the "coordination actors").
COORDINATION = ("RolloutDriver", "GroupBuffer", "RewardScorer", "WeightStore", "launcher", "ServeController")


# ---------------------------------------------------------------- naming processes


def role_of(cmdline: list[str], is_root: bool) -> str:
    """The role of one process of the job, from its command line (Ray's process titles)."""
    if is_root:
        return "launcher"
    line = " ".join(cmdline)
    binary = os.path.basename(cmdline[0]) if cmdline else "?"
    if binary in ("raylet", "gcs_server"):  # their arguments name the worker script
        return binary
    if line.startswith("ray::"):
        title = cmdline[0].removeprefix("ray::")
        if "ServeReplica:" in title:  # [SERVE_REPLICA::...:]ServeReplica:<app>:<Deployment>[.<method>]
            return title.rsplit(":", 1)[-1].split(".")[0]
        return title.split(".")[0]  # <Class>.<method> while a task runs; DashboardAgent, IDLE, ...
    for needle, role in (("default_worker.py", "ray worker (starting)"), ("log_monitor.py", "log monitor"),
                         ("autoscaler/_private/monitor.py", "autoscaler monitor"),
                         ("dashboard/dashboard.py", "dashboard")):
        if needle in line:
            return role
    return binary


class CpuSampler:
    """Every `period_s`, the CPU seconds of each process under `root_pid`, the last reading kept
    per pid (a process that exited keeps its last reading). A benchmark may poll; actors may not."""

    def __init__(self, root_pid: int, period_s: float):
        self._root, self._period = root_pid, period_s
        self._t0 = time.monotonic()
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, user + system seconds)
        self.seen_at: dict[int, float] = {}  # pid -> seconds after the sampler started, first reading
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, seconds in self.cpu.values():
            out[role] = out.get(role, 0.0) + seconds
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def first_seen_by_role(self) -> dict[str, float]:
        """Seconds after the start until the first process of each role was seen."""
        out: dict[str, float] = {}
        for pid, (role, _) in self.cpu.items():
            out[role] = min(out.get(role, float("inf")), self.seen_at[pid])
        return out

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._read()
        self._read()

    def _read(self) -> None:
        for p, role, t in job_processes(self._root):
            self.cpu[p.pid] = (role, t.user + t.system)
            self.seen_at.setdefault(p.pid, time.monotonic() - self._t0)


def job_processes(root_pid: int) -> list:
    """(process, role, CPU times) of every live process under `root_pid`, itself included."""
    import psutil as ps

    try:
        root = ps.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except ps.NoSuchProcess:
        return []
    roles, out = {}, []
    for p in procs:  # parents before children (psutil lists them in that order)
        try:
            with p.oneshot():
                t = p.cpu_times()
                parent = roles.get(p.ppid(), "")
                # A pebble reward worker inherits its scorer replica's title: count it there.
                role = parent if parent == "RewardScorer" else role_of(p.cmdline(), p.pid == root_pid)
        except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
            continue
        roles[p.pid] = role
        out.append((p, role, t))
    return out


# ---------------------------------------------------------------- the reference loop


class PlainEngine:
    """What `pmd_step.train_on_batch` asks of a DeepSpeed engine, over a module and a plain AdamW
    (one rank, no ZeRO): backward accumulates, step clips to `grad_clip` and steps."""

    def __init__(self, model, optimizer, grad_clip: float):
        self.module, self._optimizer, self._clip = model, optimizer, grad_clip
        self.device = next(model.parameters()).device
        self._norm = 0.0

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self._optimizer.param_groups]

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        pass

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        import torch

        self._norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self._clip))
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float:
        return self._norm

    def zero_optimization_stage(self) -> int:
        return 1  # the norm comes from get_global_grad_norm


def reference_loop(cfg, steps: int, threads: int, target: float, window: int,
                   on_step: Callable[[dict], None] | None = None, max_generated: int | None = None) -> dict:
    """The job's algorithm in one process; stops after `steps` steps (or once `max_generated`
    responses were sampled). Returns its rates. `on_step` gets each step's record: reward and
    entropy, the share of zero-signal groups, responses sampled so far, and (prompt, mean reward)
    per group sampled. Under `algorithm.band_filter: drop` a step samples batch after batch until
    the buffer holds enough groups in band, as the job's driver does."""
    import torch

    from async_pmd import pmd_step, wire
    from async_pmd.data import configured_source
    from async_pmd.engines import SamplingParams
    from async_pmd.engines.torch_engine import TorchEngine
    from async_pmd.grouping import GroupStore
    from async_pmd.models import load_model, load_tokenizer
    from async_pmd.rewards import RewardRunner

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = load_tokenizer(cfg.model.path)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype)
    sampler = TorchEngine(model, tokenizer, max_prompt_length=cfg.data.max_prompt_length)  # the same module
    source = configured_source(cfg.data, tokenizer, split="train")
    rewards = RewardRunner(cfg.scorer.reward_fn, timeout_s=None)  # inline: a built-in, trusted
    store = GroupStore(group_size=cfg.generator.n, algorithm=cfg.algorithm, max_staleness=0,
                       capacity_groups=cfg.buffer.capacity_groups, on_failure=cfg.buffer.on_reward_failure,
                       pad_token_id=tokenizer.pad_token_id)
    actor = cfg.actor
    optimizer = torch.optim.AdamW(model.parameters(), lr=actor.lr, betas=tuple(actor.betas),
                                  weight_decay=actor.weight_decay)
    engine = PlainEngine(model, optimizer, actor.grad_clip)
    gen = cfg.generator
    params = SamplingParams(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
                            max_new_tokens=gen.response_length, n=gen.n)
    batch_groups, reward_curve, generated, drawn = cfg.data.train_batch_size, [], 0, 0
    start = time.perf_counter()
    def over_budget() -> bool:
        return max_generated is not None and generated >= max_generated

    for step in range(steps):
        batch, sampled = None, []
        while batch is None and not over_budget():
            prompts = source.next_batch(batch_groups)
            outputs = sampler.generate([p.token_ids for p in prompts], params)
            groups = []
            for p, outs in zip(prompts, outputs):
                ids = [np.asarray(o.token_ids, np.int32) for o in outs]
                texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
                r, status, extra = rewards.score_group(p.text, texts, p.answer, dict(p.extra))
                drawn += 1
                rollout = wire.RolloutGroup(
                    uid=f"g{drawn:09d}", prompt_ids=np.asarray(p.token_ids, np.int32), response_ids=ids,
                    logprobs=[np.asarray(o.logprobs, np.float32) for o in outs],
                    finish_reasons=[o.finish_reason for o in outs], policy_version=step, prompt_text=p.text,
                    response_texts=texts, answer=p.answer, sample_index=p.index, extra={})
                groups.append(wire.ScoredGroup.from_rollout(rollout, r, status, extra))
                sampled.append((p.text, float(np.mean(r))))
            generated += len(prompts) * gen.n
            store.put(wire.ScoredBatch(groups=groups))
            batch, batch_metrics = store.take(batch_groups, step)
        if batch is None:
            break
        model.train(False)
        train_metrics = pmd_step.train_on_batch(engine, batch, actor, 0, 1, temperature=gen.temperature,
                                                max_response_length=gen.response_length)
        store.confirm(step + 1)
        reward_curve.append(float(np.mean(batch.rewards)))
        if on_step is not None:
            on_step({"step": step + 1, "reward": reward_curve[-1], "entropy": train_metrics.get("actor/entropy"),
                     "zero_signal": batch_metrics.get("groups/zero_signal"), "generated": generated,
                     "seconds": time.perf_counter() - start, "groups": sampled})
    seconds = time.perf_counter() - start
    steps = len(reward_curve)
    samples = steps * batch_groups * gen.n
    reached = first_reaching(np.asarray(reward_curve), target, window)
    per_step = seconds / max(steps, 1)
    return {"steps": steps, "seconds": seconds, "samples_s": samples / seconds,
            "steps_to_target": reached, "samples_to_target": None if reached is None else reached * batch_groups * gen.n,
            "seconds_to_target": None if reached is None else reached * per_step,
            "final_reward": float(np.mean(reward_curve[-window:]))}


def first_reaching(rewards: np.ndarray, target: float, window: int) -> int | None:
    """The first step (1-based) whose trailing `window`-step mean reward is >= `target`."""
    if not len(rewards):
        return None
    cum = np.cumsum(rewards)
    idx = np.arange(len(rewards))
    lo = np.maximum(idx - window, -1)
    means = (cum - np.where(lo >= 0, cum[np.maximum(lo, 0)], 0.0)) / (idx - lo)
    hits = np.flatnonzero(means >= target)
    return int(hits[0]) + 1 if len(hits) else None


# ---------------------------------------------------------------- the job


def job_command(out: Path, steps: int, extra: list[str]) -> tuple[list[str], Path]:
    """The demo job's command line for `steps` steps under `out`, and its run directory."""
    name = "job"
    cmd = [sys.executable, "-m", "async_pmd.launch", str(REPO / "configs" / "cluster.yaml"),
           f"trainer.output_dir={out / 'runs'}", f"trainer.experiment_name={name}",
           f"trainer.total_steps={steps}", "trainer.total_minutes=null", "trainer.save_freq=0",
           "trainer.resume=disable", "checkpoint.export_hf=false", "metrics.enabled=false",
           f"model.path={out / 'model'}", *extra]
    return cmd, out / "runs" / name


def run_job(out: Path, steps: int, extra: list[str], sample_s: float) -> dict:
    cmd, run_dir = job_command(out, steps, extra)
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "job.log", "w") as log:
        launched = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                stdout=log, stderr=subprocess.STDOUT)
        first_step_at, startup = None, {}
        with CpuSampler(proc.pid, sample_s) as sampler:
            while proc.poll() is None:
                time.sleep(sample_s / 2)
                if first_step_at is None and metrics.is_file() and metrics.stat().st_size > 0:
                    first_step_at = time.monotonic()
                    startup = {"cpu": sampler.by_role(), "seen_s": sampler.first_seen_by_role()}
        wall_s = time.monotonic() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"the job failed (exit {proc.returncode}); see {out / 'job.log'}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    records = [r for r in records if "reward/mean" in r]
    accounting = json.loads((run_dir / "accounting.json").read_text())
    return {"records": records, "accounting": accounting, "cpu": sampler.by_role(), "wall_s": wall_s,
            "startup_s": None if first_step_at is None else first_step_at - launched, "startup": startup}


def job_rates(job: dict, samples_per_step: int, target: float, window: int) -> dict:
    records = job["records"]
    first = records[0]["time/elapsed_s"]
    seconds = records[-1]["time/elapsed_s"] - first  # from the first learner step to the last
    reached = first_reaching(np.array([r["reward/mean"] for r in records]), target, window)
    out = {"steps": len(records), "seconds": seconds,
           "samples_s": (len(records) - 1) * samples_per_step / seconds if seconds > 0 else float("nan"),
           "steps_to_target": reached, "samples_to_target": None if reached is None else reached * samples_per_step,
           "seconds_to_target": None if reached is None else records[reached - 1]["time/elapsed_s"] - first,
           "final_reward": float(np.mean([r["reward/mean"] for r in records[-window:]]))}
    return out


def step_timings(job: dict) -> dict[str, float]:
    """Median ms per learner step of the loop's phases, and the replica's mean per call."""
    records = job["records"][1:] or job["records"]  # the first step carries the start-up wait
    med = {key: statistics.median(r.get(key, 0.0) for r in records) * 1e3
           for key in ("timing/step_s", "timing/wait_batch_s", "timing/train_s", "timing/weight_sync_s",
                       "timing/weight_publish_s")}
    gen = job["accounting"]["generator"]
    steps = len(job["records"])
    med["generate (replica, per step)"] = gen["generate_s"] / max(steps, 1) * 1e3
    med["pull (replica, per load)"] = gen["weight_pull_s"] / max(gen["weight_pulls"], 1) * 1e3
    return med


# ---------------------------------------------------------------- output


def print_tables(job: dict, rates: dict, ref: dict, timings: dict, load: tuple, target: float) -> dict:
    cpu, wall = job["cpu"], job["wall_s"]
    total = sum(cpu.values())
    steps = rates["steps"]
    print(f"\nload average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}   job wall {wall:.1f} s, "
          f"{steps} learner steps, CPU of all its processes {total:.1f} s\n")
    print("| process (role) | CPU s | share of the job's CPU | % of one core over the wall | CPU ms / learner step |")
    print("|---|---:|---:|---:|---:|")
    for role, seconds in cpu.items():
        print(f"| {role} | {seconds:.1f} | {seconds / total:.1%} | {seconds / wall:.0%} | "
              f"{seconds / max(steps, 1) * 1e3:.1f} |")
    coord = sum(s for r, s in cpu.items() if r in COORDINATION)
    print(f"| **coordination** ({', '.join(COORDINATION)}) | {coord:.1f} | {coord / total:.1%} | "
          f"{coord / wall:.0%} | {coord / max(steps, 1) * 1e3:.1f} |")
    print("\n| per learner step | ms (median) |\n|---|---:|")
    for key, ms in timings.items():
        print(f"| {key} | {ms:.2f} |")
    startup = job["startup_s"]
    print(f"\nstart-up, launch → first learner step: {startup:.1f} s" if startup else "\nstart-up: no step")
    if job["startup"]:
        # What the seconds before the first step were spent on: the processes that share the cores.
        seen, early = job["startup"]["seen_s"], job["startup"]["cpu"]
        print("\n| process (role), in order of appearance | first seen, s after launch | CPU s until the first step |")
        print("|---|---:|---:|")
        for role in sorted(early, key=lambda r: seen[r]):
            print(f"| {role} | {seen[role]:.1f} | {early[role]:.1f} |")
        print(f"| **all** | | **{sum(early.values()):.1f}** (2 cores: ≥ {sum(early.values()) / 2:.1f} s) |")

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    print(f"\n| | trained samples/s | seconds to reward {target} | samples to reward {target} | final reward |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("reference (one process)", ref), ("configs/cluster.yaml", rates)):
        print(f"| {name} | {r['samples_s']:,.0f} | {fmt(r['seconds_to_target'], '.1f')} | "
              f"{fmt(r['samples_to_target'], ',')} | {r['final_reward']:.3f} |")
    ratio = rates["samples_s"] / ref["samples_s"]
    t_ratio = (rates["seconds_to_target"] / ref["seconds_to_target"]
               if rates["seconds_to_target"] and ref["seconds_to_target"] else None)
    print(f"\njob / reference: samples/s {ratio:.2f}x, seconds to {target} "
          f"{fmt(t_ratio, '.2f')}x, coordination {coord / total:.1%} of the job's CPU")
    return {"samples_s_ratio": ratio, "seconds_to_target_ratio": t_ratio, "coordination_share": coord / total,
            "startup_s": startup, "startup_cpu_s": job["startup"].get("cpu", {}),
            "startup_seen_s": job["startup"].get("seen_s", {}), "cpu_s": cpu, "wall_s": wall,
            "timings_ms": timings, "job": rates,
            "reference": ref, "load_average": list(load)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--ref-steps", type=int, default=None, help="reference steps (default: --steps)")
    parser.add_argument("--ref-threads", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--window", type=int, default=20, help="trailing mean of the reward, in steps")
    parser.add_argument("--sample-s", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "overhead")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from async_pmd.config import load_config
    from async_pmd.models import ensure_tiny_model

    out = args.out.resolve()
    overrides = [f"model.path={out / 'model'}", *args.overrides]
    cfg = load_config(REPO / "configs" / "cluster.yaml", overrides)
    ensure_tiny_model(cfg.model.path, **cfg.model.tiny.model_dump())  # built once, before either clock
    load = os.getloadavg()
    ref = reference_loop(cfg, args.ref_steps or args.steps, args.ref_threads, args.target, args.window)
    job = run_job(out, args.steps, args.overrides, args.sample_s)
    samples_per_step = cfg.data.train_batch_size * cfg.generator.n
    rates = job_rates(job, samples_per_step, args.target, args.window)
    summary = print_tables(job, rates, ref, step_timings(job), load, args.target)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
