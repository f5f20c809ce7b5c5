"""End-to-end learning with each inference engine, one run after another on this machine.

    python ops/bench/engines_e2e.py [--engines torch sglang vllm] [--steps 3000] [--minutes 9]
        [--out runs/engines_e2e] [--publish DIR] [--report-only] [--venv ENGINE=PATH]

Runs the whole system through the real CLI (`python -m async_pmd.launch`), each engine with its
own venv and config: torch `.venv` + `configs/cluster.yaml`, SGLang `.venv-sglang` +
`configs/cluster_sglang.yaml`, vLLM `.venv-vllm` + `configs/cluster_vllm.yaml`. Every run uses the
same head-dim-64 tiny model (`models.TINY_HEAD_DIM_64`, built once per run directory with seed
0), so the three differ only in the engine. Then it reads each run's `metrics.jsonl` and
`accounting.json` and writes `engines_e2e.md` (and `summary.json`) to `--out`:

- seconds to 0.8: first learner step whose reward, smoothed by a trailing 20-step mean, is
  >= 0.8, counted from the first learner step (start-up left out);
- trained samples/s: groups trained × n over the run's learner time;
- weight sync ms: the learner's publish (median `timing/weight_sync_s`) and the generator's load
  into its engine (mean of `weight_pull_s / weight_pulls`: fetch + decode + the engine API call);
- accounting exact: `dispatched == trained + filtered + stale + failed + unfinished` on every record.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNS = {
    "torch": (".venv", "configs/cluster.yaml"),
    "sglang": (".venv-sglang", "configs/cluster_sglang.yaml"),
    "vllm": (".venv-vllm", "configs/cluster_vllm.yaml"),
}
TINY_64 = "{hidden_size: 128, num_layers: 2, num_heads: 2, num_kv_heads: 2, intermediate_size: 256}"
WINDOW = 20


def run(engine: str, out: Path, steps: int, minutes: float, venv: str | None = None) -> None:
    venv, config = venv or RUNS[engine][0], RUNS[engine][1]
    run_dir = out / engine
    if (run_dir / "accounting.json").exists():
        return  # a finished run is never run again
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str((REPO / venv).resolve() / "bin" / "python"), "-m", "async_pmd.launch", str(REPO / config),
           f"trainer.output_dir={out}", f"trainer.experiment_name={engine}", f"model.path={out / 'tiny64'}",
           f"model.tiny={TINY_64}", f"trainer.total_steps={steps}", f"trainer.total_minutes={minutes}",
           "trainer.save_freq=0", "checkpoint.export_hf=false", "metrics.enabled=false"]
    print(f"[{engine}] {' '.join(cmd)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{engine}.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={"PYTHONPATH": str(REPO), **_env()})


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def summarize(engine: str, out: Path) -> dict:
    run_dir = out / engine
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    accounting = json.loads((run_dir / "accounting.json").read_text())
    n = 8
    t0 = records[0]["time/elapsed_s"] - records[0]["timing/step_s"]
    rewards = [r["reward/mean"] for r in records]
    smoothed = [statistics.fmean(rewards[max(0, i - WINDOW + 1) : i + 1]) for i in range(len(rewards))]
    hit = next((i for i, v in enumerate(smoothed) if i >= WINDOW - 1 and v >= 0.8), None)
    elapsed = records[-1]["time/elapsed_s"] - t0
    exact = all(r["groups/dispatched"] == sum(r[f"groups/{k}"] for k in ("trained", "filtered", "stale", "failed",
                                                                            "unfinished")) for r in records)
    gen = accounting["generator"]
    return {
        "engine": engine,
        "steps": len(records),
        "seconds_to_0.8": None if hit is None else records[hit]["time/elapsed_s"] - t0,
        "step_at_0.8": None if hit is None else records[hit]["step"],
        "samples_to_0.8": None if hit is None else records[hit]["groups/trained"] * n,
        "trained_samples_per_s": records[-1]["groups/trained"] * n / elapsed,
        "final_reward": statistics.fmean(rewards[-100:]),
        "publish_ms_median": 1e3 * statistics.median(r["timing/weight_sync_s"] for r in records),
        "engine_load_ms_mean": 1e3 * gen["weight_pull_s"] / max(gen["weight_pulls"], 1),
        "weight_loads": gen["weight_pulls"],
        "accounting_exact": exact,
        "retries": accounting["driver/retries"],
    }


def report(rows: list[dict], out: Path) -> str:
    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    lines = ["| engine | steps | seconds to 0.8 | samples to 0.8 | trained samples/s | final reward (last 100) "
             "| weight publish ms (median) | engine weight load ms (mean, loads) | accounting exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['steps']} | {fmt(r['seconds_to_0.8'], '.0f')} | "
                     f"{fmt(r['samples_to_0.8'], ',')} | {r['trained_samples_per_s']:,.0f} | {r['final_reward']:.3f} | "
                     f"{r['publish_ms_median']:.1f} | {r['engine_load_ms_mean']:.1f} ({r['weight_loads']}) | "
                     f"{'yes' if r['accounting_exact'] else 'NO'} |")
    table = "\n".join(lines) + "\n"
    (out / "engines_e2e.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "engines_e2e")
    parser.add_argument("--publish", type=Path, default=None, help="also copy the table and summary here")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--venv", action="append", default=[], metavar="ENGINE=PATH",
                        help="another venv for an engine, e.g. torch=/path/to/.venv")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if not args.report_only:
        venvs = dict(item.split("=", 1) for item in args.venv)
        for engine in args.engines:
            run(engine, out, args.steps, args.minutes, venvs.get(engine))
    table = report([summarize(e, out) for e in args.engines if (out / e / "accounting.json").exists()], out)
    print(table)
    if args.publish:
        args.publish.mkdir(parents=True, exist_ok=True)
        for name in ("engines_e2e.md", "summary.json"):
            shutil.copy(out / name, args.publish / ("engines_e2e_summary.json" if name == "summary.json" else name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
