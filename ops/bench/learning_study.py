"""The learning study: reward against samples and wall time, per estimator and per τ, over seeds.

    .venv/bin/python ops/bench/learning_study.py [--steps 3000] [--seeds 0 1 2]
        [--settings ploo rloo grpo ploo_tau0.1 ploo_tau0.01] [--out runs/learning_study]
        [--window 20] [--plot-only] [--publish DIR] [key=value ...]

Runs the demo config (`configs/cluster.yaml`, the full system through the real CLI) once per
setting and seed, one run at a time, then reads each run's `metrics.jsonl` and writes to `--out`:

- `learning_study.png`: smoothed reward against trained samples and against wall time for
  ploo + opmd, rloo + opmd and grpo + vanilla; response entropy against samples; and the τ sweep
  of ploo + opmd. Lines are the mean over seeds, bands the min–max over seeds.
- `learning_study.md`: samples and seconds to a smoothed reward of 0.8 and 0.9 (median and min
  over seeds; a seed that never gets there counts as infinitely slow, so a median of "–" means
  most seeds did not reach it), plus the final reward and entropy.
- `summary.json`: the same numbers, machine-readable.

A seed changes the tiny model's initialisation (`model.tiny.seed`, one model directory per seed),
the data order (`data.seed`) and the learner's torch seed (`trainer.seed`); sampling is fresh
randomness in every run. Reward is smoothed with a trailing mean over `--window` learner steps
(the per-step reward is a mean over only 32 × 8 samples, too noisy to threshold). Samples are
trained responses (`groups/trained` × n); seconds run from the start of the first learner step,
so process, Ray, Serve and DeepSpeed start-up (~15–25 s) are left out.

A run whose `metrics.jsonl` already holds `--steps` steps is not run again, so an interrupted
study continues where it stopped; `--plot-only` only re-reads the runs. Extra `key=value`
arguments go to every run (e.g. `trainer.total_minutes=15`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]

ESTIMATOR = "algorithm.adv_estimator={}"
LOSS = "actor.policy_loss.loss_mode={}"


def _tau(tau: float) -> list[str]:
    return [f"algorithm.partition_tau={tau}", f"actor.policy_loss.pmd_tau={tau}"]


# name -> (label, overrides on top of the demo config). "ploo" is also the τ = 1 point of the sweep.
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "ploo": ("ploo + opmd (τ 1)", [ESTIMATOR.format("ploo"), LOSS.format("opmd"), *_tau(1.0)]),
    "rloo": ("rloo + opmd", [ESTIMATOR.format("rloo"), LOSS.format("opmd"), *_tau(1.0)]),
    "grpo": ("grpo + vanilla (PPO-clip)", [ESTIMATOR.format("grpo"), LOSS.format("vanilla")]),
    "ploo_tau0.1": ("ploo + opmd, τ 0.1", [ESTIMATOR.format("ploo"), LOSS.format("opmd"), *_tau(0.1)]),
    "ploo_tau0.01": ("ploo (seed's) + opmd, τ 0.01", [ESTIMATOR.format("ploo"), LOSS.format("opmd"), *_tau(0.01)]),
    # The exact leave-one-out: equal to the seed's ploo at τ 1 and 0.1 on 0/1 rewards
    # (tests/async_pmd/test_algos_seed.py), so only τ 0.01 tells them apart.
    "ploo_exact_tau0.01": ("ploo_exact + opmd, τ 0.01",
                           [ESTIMATOR.format("ploo_exact"), LOSS.format("opmd"), *_tau(0.01)]),
}
ESTIMATORS = ("ploo", "rloo", "grpo")
TAU_SWEEP = {"ploo": 1.0, "ploo_tau0.1": 0.1, "ploo_tau0.01": 0.01, "ploo_exact_tau0.01": 0.01}
THRESHOLDS = (0.8, 0.9)
FINAL_STEPS = 100  # the final reward and entropy are means over the last this many steps


# ---------------------------------------------------------------- running


def run_name(setting: str, seed: int) -> str:
    return f"{setting}_s{seed}"


def completed_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"reward/mean"' in line)


def launch(out: Path, setting: str, seed: int, steps: int, extra: list[str]) -> float:
    """One run through the CLI; its console goes to out/logs/<run>.log. Returns wall seconds."""
    name = run_name(setting, seed)
    run_dir = out / "runs" / name
    if run_dir.exists():  # an unfinished earlier attempt: start clean (metrics.jsonl appends)
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "async_pmd.launch", str(REPO / "configs" / "cluster.yaml"),
           *SETTINGS[setting][1],
           f"trainer.output_dir={out / 'runs'}", f"trainer.experiment_name={name}",
           f"trainer.total_steps={steps}", "trainer.save_freq=0", "trainer.resume=disable",
           "checkpoint.export_hf=false", "metrics.enabled=false",
           f"model.path={out / 'models' / f'tiny_s{seed}'}", f"model.tiny.seed={seed}",
           f"trainer.seed={seed}", f"data.seed={seed}", *extra]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(out / "logs" / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                              stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed (exit {proc.returncode}); see {out / 'logs' / f'{name}.log'}")
    return time.monotonic() - start


# ---------------------------------------------------------------- reading


def load_run(run_dir: Path) -> dict[str, np.ndarray]:
    """Per learner step: samples, seconds, reward, entropy (records of validation alone skipped)."""
    n = int(yaml.safe_load((run_dir / "config.yaml").read_text())["generator"]["n"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "reward/mean" in r]
    if not records:
        raise ValueError(f"{run_dir} has no learner steps")
    # Seconds from the start of the first learner step: start-up is not learning.
    t0 = records[0]["time/elapsed_s"] - records[0]["timing/step_s"]
    return {
        "step": np.array([r["step"] for r in records], np.int64),
        "samples": np.array([r["groups/trained"] * n for r in records], np.float64),
        "seconds": np.array([r["time/elapsed_s"] - t0 for r in records], np.float64),
        "reward": np.array([r["reward/mean"] for r in records], np.float64),
        "entropy": np.array([r.get("actor/entropy", math.nan) for r in records], np.float64),
    }


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` points (fewer at the start)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    csum = np.concatenate([[0.0], np.cumsum(x, dtype=np.float64)])
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def first_reaching(run: dict[str, np.ndarray], threshold: float, window: int) -> tuple[float, float] | None:
    """(samples, seconds) at the first step whose smoothed reward is >= threshold; None if never."""
    hits = np.flatnonzero(smooth(run["reward"], window) >= threshold)
    if hits.size == 0:
        return None
    i = hits[0]
    return float(run["samples"][i]), float(run["seconds"][i])


# ---------------------------------------------------------------- summarising


def _median_min(values: list[float | None]) -> tuple[float | None, float | None]:
    """Median and min over seeds; a seed that never reached counts as +inf (None if the result is)."""
    finite = [v for v in values if v is not None]
    if not finite:
        return None, None
    med = statistics.median([math.inf if v is None else v for v in values])
    return (None if math.isinf(med) else med), min(finite)


def summarize(runs: dict[str, list[dict[str, np.ndarray]]], window: int) -> dict[str, dict]:
    """Per setting: seeds, steps, and for each threshold the median/min samples and seconds."""
    summary = {}
    for setting, seeds in runs.items():
        row: dict = {"label": SETTINGS[setting][0] if setting in SETTINGS else setting,
                     "seeds": len(seeds), "steps": int(min(len(r["step"]) for r in seeds))}
        for th in THRESHOLDS:
            hits = [first_reaching(r, th, window) for r in seeds]
            row[f"reached_{th}"] = sum(h is not None for h in hits)
            for j, unit in enumerate(("samples", "seconds")):
                med, low = _median_min([None if h is None else h[j] for h in hits])
                row[f"{unit}_to_{th}"] = {"median": med, "min": low}
        row["final_reward"] = float(np.mean([r["reward"][-FINAL_STEPS:].mean() for r in seeds]))
        row["final_entropy"] = float(np.mean([np.nanmean(r["entropy"][-FINAL_STEPS:]) for r in seeds]))
        summary[setting] = row
    return summary


def _fmt(stat: dict, unit: str) -> str:
    if stat["median"] is None and stat["min"] is None:
        return "–"
    med = "–" if stat["median"] is None else (f"{stat['median'] / 1e3:,.0f} k" if unit == "samples"
                                                else f"{stat['median']:,.0f} s")
    low = f"{stat['min'] / 1e3:,.0f} k" if unit == "samples" else f"{stat['min']:,.0f} s"
    return f"{med} ({low})"


def table_markdown(summary: dict[str, dict], window: int) -> str:
    head = ["setting", "seeds × steps"]
    for th in THRESHOLDS:
        head += [f"samples to {th}", f"seconds to {th}"]
    head += ["final reward", "final entropy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary.values():
        cells = [row["label"], f"{row['seeds']} × {row['steps']:,}"]
        for th in THRESHOLDS:
            reached = f" [{row[f'reached_{th}']}/{row['seeds']}]"
            cells += [_fmt(row[f"samples_to_{th}"], "samples") + reached, _fmt(row[f"seconds_to_{th}"], "seconds")]
        cells += [f"{row['final_reward']:.3f}", f"{row['final_entropy']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Median (min) over seeds of the first step at which the reward, smoothed by a trailing "
                 f"{window}-step mean, reaches the threshold; [k/N] = seeds that reached it. Final = mean "
                 f"of the last {FINAL_STEPS} steps, averaged over seeds.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plotting


def _band(runs: list[dict[str, np.ndarray]], x_key: str, y_key: str, window: int, points: int = 200):
    """x grid up to where the shortest run ends (so every point averages every seed); mean, min
    and max over seeds of the smoothed y."""
    end = min(r[x_key][-1] for r in runs)
    grid = np.linspace(0.0, end, points)
    ys = np.stack([np.interp(grid, r[x_key], smooth(r[y_key], window)) for r in runs])
    return grid, ys.mean(0), ys.min(0), ys.max(0)


def _panel(ax, runs, settings, x_key, y_key, window, labels, xscale=1.0):
    for setting in settings:
        if setting not in runs:
            continue
        x, mean, low, high = _band(runs[setting], x_key, y_key, window)
        line, = ax.plot(x / xscale, mean, label=f"{labels[setting]} (n={len(runs[setting])})")
        ax.fill_between(x / xscale, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.grid(alpha=0.3)


def plot(runs: dict[str, list[dict[str, np.ndarray]]], path: Path, window: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {s: SETTINGS[s][0] if s in SETTINGS else s for s in runs}
    tau_labels = {s: f"{'ploo_exact' if 'exact' in s else 'ploo'} + opmd, τ {t:g}" for s, t in TAU_SWEEP.items()}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=80)
    (a, b), (c, d) = axes
    _panel(a, runs, ESTIMATORS, "samples", "reward", window, labels, 1e3)
    a.set(xlabel="trained samples (thousands)", ylabel="reward (smoothed)", title="reward vs samples")
    _panel(b, runs, ESTIMATORS, "seconds", "reward", window, labels)
    b.set(xlabel="wall seconds (from the first learner step)", ylabel="reward (smoothed)",
          title="reward vs wall time")
    _panel(c, runs, ESTIMATORS, "samples", "entropy", window, labels, 1e3)
    c.set(xlabel="trained samples (thousands)", ylabel="response entropy (nats/token)",
          title="response entropy vs samples")
    _panel(d, runs, tuple(TAU_SWEEP), "samples", "reward", window, tau_labels, 1e3)
    d.set(xlabel="trained samples (thousands)", ylabel="reward (smoothed)", title="τ sweep, ploo + opmd")
    for ax in (a, b, d):
        ax.axhline(0.8, color="grey", linestyle=":", linewidth=1)
        ax.axhline(0.9, color="grey", linestyle="--", linewidth=1)
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------- main


def collect(out: Path, settings: list[str], seeds: list[int], steps: int) -> dict[str, list[dict[str, np.ndarray]]]:
    """The runs that finished `steps` learner steps (one still running, or cut short, is left out)."""
    runs: dict[str, list] = {}
    for setting in settings:
        for seed in seeds:
            run_dir = out / "runs" / run_name(setting, seed)
            if completed_steps(run_dir) >= steps:
                runs.setdefault(setting, []).append(load_run(run_dir))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="learner steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "learning_study")
    parser.add_argument("--window", type=int, default=20, help="steps in the trailing reward mean")
    parser.add_argument("--plot-only", action="store_true", help="only re-read the runs and redraw")
    parser.add_argument("--publish", type=Path, default=None,
                        help="also copy the PNG, the table and summary.json here (README's figures)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        for seed in args.seeds:  # seed-major: a study cut short still has every setting
            for setting in args.settings:
                run_dir = out / "runs" / run_name(setting, seed)
                if completed_steps(run_dir) >= args.steps:
                    print(f"{run_name(setting, seed)}: done already", flush=True)
                    continue
                seconds = launch(out, setting, seed, args.steps, args.overrides)
                print(f"{run_name(setting, seed)}: {seconds:.0f} s", flush=True)
    runs = collect(out, args.settings, args.seeds, args.steps)
    if not runs:
        print(f"no runs under {out / 'runs'}", file=sys.stderr)
        return 1
    summary = summarize(runs, args.window)
    table = table_markdown(summary, args.window)
    (out / "learning_study.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    seeds = sorted({len(v) for v in runs.values()})
    title = (f"configs/cluster.yaml: a+b= mod 10, tiny Qwen2, 32 prompts × 8 responses per step\n"
             f"seeds per setting {'/'.join(map(str, seeds))}; line = mean over seeds, band = min–max; "
             f"reward smoothed over {args.window} steps")
    plot(runs, out / "learning_study.png", args.window, title)
    print(table)
    print(f"wrote {out / 'learning_study.png'}, {out / 'learning_study.md'}, {out / 'summary.json'}")
    if args.publish is not None:
        args.publish.mkdir(parents=True, exist_ok=True)
        for name in ("learning_study.png", "learning_study.md", "summary.json"):
            shutil.copy2(out / name, args.publish / name)
        print(f"copied them to {args.publish}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
