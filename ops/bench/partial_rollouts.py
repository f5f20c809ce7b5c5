"""Partial rollouts off vs on, on the long-tail task, measured in one go.

    .venv/bin/python ops/bench/partial_rollouts.py [--train-s 150] [--segment 16] [key=value ...]

Runs `python -m async_pmd.launch configs/longtail.yaml` twice, one after the other, with
`generator.partial_rollout.enable=false` and `=true` (everything else equal), each until
`--train-s` seconds after its first learner step (process start-up, which varies with the load
of the machine, is left out). For each it prints, over that window: trained samples/s, the
generator's busy fraction (seconds inside the engine over the window), the learner's idle
fraction (seconds waiting for a batch over the window), mean staleness, segments per response,
and the mean reward of the last 20 steps; a markdown table and JSON go to ops/bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "ops" / "bench" / "results"
COMMON = ("actor.lr=1e-3", "data.train_batch_size=16", "generator.prompts_per_request=8", "trainer.save_freq=0",
          "metrics.enabled=false", "checkpoint.export_hf=false", "trainer.total_steps=100000")
_STARTUP_ALLOWANCE_S = 110  # start-up under load has taken 40-95 s here; the window is cut from the records


def run(out: Path, name: str, train_s: float, extra: list[str]) -> tuple[list[dict], dict]:
    minutes = (train_s + _STARTUP_ALLOWANCE_S) / 60
    cmd = [sys.executable, "-m", "async_pmd.launch", str(REPO / "configs" / "longtail.yaml"),
           f"trainer.output_dir={out}", f"trainer.experiment_name=partial_{name}", f"trainer.total_minutes={minutes}",
           f"model.path={out / 'model'}", *COMMON, *extra]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"{name}: the run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / f"partial_{name}" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "timing/step_s" in r], json.loads((out / f"partial_{name}" / "accounting.json").read_text())


def measure(records: list[dict], summary: dict, train_s: float, n: int) -> dict:
    start = records[0]["time/elapsed_s"]
    window = [r for r in records if r["time/elapsed_s"] - start <= train_s]
    seconds = window[-1]["time/elapsed_s"] - start
    trained = window[-1]["groups/trained"] - records[0]["groups/trained"]
    gen = summary["generator"]
    # The generator's engine seconds over the whole run, spread evenly: it starts serving at the
    # first request, which is about when the learner starts waiting for its first batch.
    run_s = records[-1]["time/elapsed_s"] - start + records[0]["timing/wait_batch_s"]
    return {
        "steps": len(window), "seconds": round(seconds, 1),
        "samples_s": round(trained * n / seconds, 1),
        "generator_busy": round(gen["generate_s"] / run_s, 3),
        "learner_idle": round(sum(r["timing/wait_batch_s"] for r in window[1:]) / seconds, 3),
        "staleness": round(statistics.mean(r["staleness/mean"] for r in window), 3),
        "segments_per_response": round(statistics.mean(r["partial/segments_per_response"] for r in window), 2),
        "old_version_token_share": round(statistics.mean(r["partial/old_version_token_share"] for r in window), 3),
        "response_length": round(statistics.mean(r["response_length/mean"] for r in window), 1),
        "reward": round(statistics.mean(r["reward/mean"] for r in window[-20:]), 3),
        "restarts": window[-1].get("partial/restarts", 0),
        "accounting_exact": all(r["groups/dispatched"] == sum(r[f"groups/{k}"] for k in (
            "trained", "filtered", "stale", "failed", "unfinished")) for r in records),
    }


def table(results: dict, train_s: float, segment: int) -> str:
    header = ("| partial rollouts | steps | trained samples/s | generator busy | learner idle | mean staleness "
              "| segments / response | tokens under an older version | mean response length | reward (last 20 steps) "
              "| restarts | accounting exact |")
    rows = [header, "|---" * 12 + "|"]
    for name, m in results.items():
        rows.append(f"| {name} | {m['steps']} | {m['samples_s']:,} | {m['generator_busy']:.0%} | {m['learner_idle']:.0%} "
                    f"| {m['staleness']} | {m['segments_per_response']} | {m['old_version_token_share']:.1%} "
                    f"| {m['response_length']} | {m['reward']} | {m['restarts']} "
                    f"| {'yes' if m['accounting_exact'] else 'NO'} |")
    return f"{train_s:g} s of training each, segments of {segment} tokens\n\n" + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-s", type=float, default=150.0)
    parser.add_argument("--segment", type=int, default=16)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name, enable in (("off", "false"), ("on", "true")):
            records, summary = run(out, name, args.train_s, [
                f"generator.partial_rollout.enable={enable}",
                f"generator.partial_rollout.segment_tokens={args.segment}", *args.overrides])
            results[name] = measure(records, summary, args.train_s, n=8)
            print(name, results[name], flush=True)
    text = table(results, args.train_s, args.segment)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "partial_rollouts.md").write_text(text)
    (RESULTS / "partial_rollouts.json").write_text(json.dumps(
        {"train_s": args.train_s, "segment_tokens": args.segment, "overrides": args.overrides,
         "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
