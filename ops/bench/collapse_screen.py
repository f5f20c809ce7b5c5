"""Screen a change to the demo's learning on many seeds fast: the single-process loop, not the job.

    .venv/bin/python ops/bench/collapse_screen.py --name base [--seeds 0 1 2 3 4 5] [--steps 3000]
        [--jobs 2] [--max-generated N] [--out runs/collapse_screen] [key=value ...]

Each seed runs `overhead.py`'s reference loop (the job's model, task, sampler, advantages, loss
and optimizer in one process, one torch thread, synchronous: staleness 0) on `configs/cluster.yaml`
with the overrides, seeded as the learning study seeds a run (`model.tiny.seed`, `data.seed`,
`trainer.seed`). A run takes ~3 minutes of one core where the job takes 4–8 minutes of two, so
`--jobs 2` screens two seeds at once. It is a screen: what it finds is then run through the job
(`learning_study.py`), which is what README reports.

Per seed it prints the steps to a smoothed reward of 0.8 and 0.9, the responses sampled to 0.9
(more than the trained ones under `band_filter: drop`), the final reward, entropy and share of
groups with all-equal rewards, and how the prompts split in the last `--window-prompts` steps:
"solved" (≥ 95% of its responses right), "dead" (≤ 5% right: its groups are all wrong, no signal
under any estimator) and the rest. `<out>/<name>_s<seed>.json` keeps every step. `--max-generated` stops a run once
that many responses were sampled (a budget in samples, for settings that sample more per step).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("overhead", HERE / "overhead.py")
overhead = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overhead)


def screen_one(out: Path, name: str, seed: int, steps: int, overrides: list[str], max_generated: int | None) -> Path:
    from async_pmd.config import load_config
    from async_pmd.models import ensure_tiny_model

    cfg = load_config(REPO / "configs" / "cluster.yaml", [
        f"model.path={out / 'models' / f'tiny_s{seed}'}", f"model.tiny.seed={seed}", f"data.seed={seed}",
        f"trainer.seed={seed}", *overrides])
    ensure_tiny_model(cfg.model.path, **cfg.model.tiny.model_dump())
    records: list[dict] = []
    overhead.reference_loop(cfg, steps, threads=1, target=0.9, window=20, on_step=records.append,
                            max_generated=max_generated)
    path = out / f"{name}_s{seed}.json"
    path.write_text(json.dumps({"name": name, "seed": seed, "overrides": overrides, "records": records}))
    return path


def prompt_split(records: list[dict], last: int) -> dict[str, int]:
    """Prompts of the last `last` steps by their mean reward there: solved (>= 0.95), dead
    (<= 0.05: wrong nearly every time, so its groups carry no signal), the rest mixed."""
    rewards = defaultdict(list)
    for record in records[-last:]:
        for prompt, reward in record["groups"]:
            rewards[prompt].append(reward)
    if not rewards:
        return {"solved": None, "dead": None, "mixed": None}
    means = [float(np.mean(v)) for v in rewards.values()]
    solved = sum(m >= 0.95 for m in means)
    dead = sum(m <= 0.05 for m in means)
    return {"solved": solved, "dead": dead, "mixed": len(means) - solved - dead}


def summarize(run: dict, window: int, last: int) -> dict:
    records = run["records"]
    reward = np.array([r["reward"] for r in records])
    row = {"seed": run["seed"], "steps": len(records)}
    for threshold in (0.8, 0.9):
        reached = overhead.first_reaching(reward, threshold, window)
        row[f"step_to_{threshold}"] = reached
        row[f"sampled_to_{threshold}"] = None if reached is None else records[reached - 1]["generated"]
    tail = records[-min(100, len(records)):]
    row["final_reward"] = float(np.mean([r["reward"] for r in tail]))
    row["final_entropy"] = float(np.mean([r["entropy"] for r in tail]))
    row["final_zero_signal"] = float(np.mean([r["zero_signal"] for r in tail]))
    row.update(prompt_split(records, last))
    return row


def table(name: str, rows: list[dict]) -> str:
    reached = sum(r["step_to_0.9"] is not None for r in rows)
    head = ("seed", "steps", "step to 0.8", "step to 0.9", "sampled to 0.9", "final reward", "final entropy",
            "zero-signal", "prompts solved / dead / mixed")
    lines = [f"{name}: {reached}/{len(rows)} seeds reached 0.9", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rows:
        sampled = "never" if r["sampled_to_0.9"] is None else f"{r['sampled_to_0.9'] / 1e3:,.0f} k"
        cells = (r["seed"], r["steps"], r["step_to_0.8"] or "never", r["step_to_0.9"] or "never", sampled,
                 f"{r['final_reward']:.3f}", f"{r['final_entropy']:.3f}", f"{r['final_zero_signal']:.2f}",
                 "–" if r["solved"] is None else f"{r['solved']} / {r['dead']} / {r['mixed']}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="names this setting's files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--jobs", type=int, default=2, help="seeds at once (one core each)")
    parser.add_argument("--max-generated", type=int, default=None)
    parser.add_argument("--window", type=int, default=20, help="steps in the trailing reward mean")
    parser.add_argument("--window-prompts", type=int, default=200, help="last steps of the prompt split")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "collapse_screen")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in args.seeds if not (out / f"{args.name}_s{s}.json").is_file()]  # a finished seed is kept
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(screen_one, out, args.name, s, args.steps, args.overrides, args.max_generated)
                       for s in todo]:
            print(f"wrote {future.result()}", flush=True)
    rows = [summarize(json.loads((out / f"{args.name}_s{s}.json").read_text()), args.window, args.window_prompts)
            for s in args.seeds]
    text = table(args.name, rows)
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
