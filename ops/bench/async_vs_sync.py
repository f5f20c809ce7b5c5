"""Asynchronous vs synchronous PMD on the same config, measured in one go.

    .venv/bin/python ops/bench/async_vs_sync.py [--steps 300] [key=value ...]

Runs `python -m async_pmd.launch configs/cluster.yaml` twice, with `buffer.max_staleness=0`
(synchronous: generation waits for the weights being trained) and `=1` (one step of overlap),
then prints trained samples/s for each and their ratio, beside the measured generation time g
and training time t per step and the ideal overlap speed-up (g + t) / max(g, t) (limit 2x).
It also prints the weight sync cost: publish (gather + encode + store) plus a replica's pull
(fetch + decode + load), against one `ray.put` + `ray.get` of the same tensors measured here.
The first `--warmup` steps (process start, first DeepSpeed step) are left out of the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(out: Path, name: str, steps: int, extra: list[str]) -> tuple[list[dict], dict]:
    cmd = [sys.executable, "-m", "async_pmd.launch", str(REPO / "configs" / "cluster.yaml"),
           f"trainer.output_dir={out}", f"trainer.experiment_name={name}", f"trainer.total_steps={steps}",
           "trainer.total_minutes=null", "trainer.save_freq=0", "metrics.enabled=false",
           f"model.path={out / 'model'}", *extra]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((out / name / "accounting.json").read_text())


def rates(records: list[dict], summary: dict, warmup: int, samples_per_step: int) -> dict:
    steady = records[warmup:]
    seconds = steady[-1]["time/elapsed_s"] - records[warmup - 1]["time/elapsed_s"]
    gen = summary["generator"]
    # Generation seconds per train batch: the replica's busy time per response, times a batch.
    g = gen["generate_s"] / max(gen["responses"], 1) * samples_per_step
    t = statistics.median(r["timing/train_s"] + r["timing/weight_sync_s"] for r in steady)
    return {"samples_s": len(steady) * samples_per_step / seconds, "g": g, "t": t,
            "publish_s": statistics.median(r.get("timing/weight_publish_s", 0.0) for r in steady),
            "pull_s": gen["weight_pull_s"] / max(gen["weight_pulls"], 1),
            "reward": steady[-1]["reward/mean"]}


def put_get_baseline(model_dir: Path, repeats: int = 20) -> float:
    """One ray.put + ray.get (from another process) of the same tensors, median seconds."""
    import ray
    import torch  # noqa: F401 - Ray serialises the tensors

    from async_pmd.models import load_model

    state = {k: v.detach().clone() for k, v in load_model(model_dir).state_dict().items()}
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0)
    def fetch(refs):
        return len(ray.get(refs[0]))

    try:
        ray.get(fetch.remote([ray.put(state)]))  # warm the worker
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            ray.get(fetch.remote([ray.put(state)]))
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from async_pmd.config import load_config

    cfg = load_config(REPO / "configs" / "cluster.yaml", args.overrides)
    samples_per_step = cfg.data.train_batch_size * cfg.generator.n
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        results = {}
        for staleness in (0, 1):
            records, summary = run(out, f"staleness{staleness}", args.steps,
                                   [f"buffer.max_staleness={staleness}", *args.overrides])
            results[staleness] = rates(records, summary, args.warmup, samples_per_step)
        baseline = put_get_baseline(out / "model")
    sync, asyn = results[0], results[1]
    print(f"\n{args.steps} steps of {samples_per_step} samples, first {args.warmup} left out\n")
    print("| mode | trained samples/s | g: generate s/step | t: train+sync s/step | ideal (g+t)/max(g,t) | final reward |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("sync (max_staleness 0)", sync), ("async (max_staleness 1)", asyn)):
        ideal = (r["g"] + r["t"]) / max(r["g"], r["t"])
        print(f"| {name} | {r['samples_s']:,.0f} | {r['g'] * 1e3:.1f} ms | {r['t'] * 1e3:.1f} ms | {ideal:.2f}x | {r['reward']:.3f} |")
    print(f"\nasync / sync = {asyn['samples_s'] / sync['samples_s']:.2f}x\n")
    print("| weight sync | ms |")
    print("|---|---:|")
    print(f"| publish: gather + encode + WeightStore put (median per step) | {asyn['publish_s'] * 1e3:.2f} |")
    print(f"| pull on the replica: fetch + decode + in-place load (mean) | {asyn['pull_s'] * 1e3:.2f} |")
    print(f"| publish + pull, to all (1) replicas | {(asyn['publish_s'] + asyn['pull_s']) * 1e3:.2f} |")
    print(f"| baseline: one ray.put + ray.get of the same tensors | {baseline * 1e3:.2f} |")


if __name__ == "__main__":
    main()
