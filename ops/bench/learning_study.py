"""The learning study: reward against samples and wall time, per estimator and per τ, over seeds.

    .venv/bin/python ops/bench/learning_study.py [--steps 3000] [--seeds 0 1 2 3 4]
        [--settings ploo rloo grpo ploo_tau0.1 ploo_tau0.01] [--out runs/learning_study]
        [--lrs 3e-5 1e-4 3e-4 --sweep-seeds 100 101] [--window 20] [--plot-only]
        [--publish DIR] [key=value ...]

Runs the demo config (`configs/cluster.yaml`, the full system through the real CLI) once per
setting and seed, one run at a time, then reads each run's `metrics.jsonl` and writes to `--out`:

- `learning_study.png`: smoothed reward against trained samples and against wall time for
  ploo + opmd, rloo + opmd and grpo + vanilla; response entropy against samples; and the τ sweep
  of ploo + opmd. Thick lines are the mean over seeds, bands the min–max, and every seed's own
  curve is drawn thin, so one seed that collapses is visible.
- `learning_study.md`: per setting, how many seeds reached a smoothed reward of 0.8 and 0.9, the
  median and worst samples and seconds to get there (a seed that never gets there counts as
  infinitely slow: a worst of "never" means some seed did not), the final reward and entropy,
  and the final share of groups with all-equal rewards (`groups/zero_signal`, no signal left).
- `summary.json`: the same numbers, machine-readable.

With `--lrs`, each setting first runs at each learning rate on `--sweep-seeds` (seeds that are
not the reported ones), the best rate per setting is chosen (most sweep seeds reaching 0.9, then
the fewest median samples to it, then the highest final reward; `sweep.md` / `sweep.json`), and
the reported `--seeds` run at that rate: every method is compared at its own best rate. A setting
whose best is the config's own rate (`actor.lr`) reports runs at that rate under their plain names,
so the default's runs count for it.

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


def config_value(key: str, overrides: list[str]) -> float:
    """A number of the demo config, as the extra `key=value` overrides leave it."""
    for override in reversed(overrides):
        name, _, value = override.partition("=")
        if name == key:
            return float(value)
    node = yaml.safe_load((REPO / "configs" / "cluster.yaml").read_text())
    for part in key.split("."):
        node = node[part]
    return float(node)


def reported_lrs(chosen: dict[str, float], config_lr: float) -> dict[str, float | None]:
    """The rate each setting's reported runs are named by: None (the plain name) where the sweep
    chose the config's own rate, so the default's runs count for it."""
    return {setting: None if lr == config_lr else lr for setting, lr in chosen.items()}


def run_name(setting: str, seed: int, lr: float | None = None) -> str:
    return f"{setting}_s{seed}" if lr is None else f"{setting}_lr{lr:g}_s{seed}"


def completed_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"reward/mean"' in line)


def launch(out: Path, setting: str, seed: int, steps: int, extra: list[str], lr: float | None = None) -> float:
    """One run through the CLI; its console goes to out/logs/<run>.log. Returns wall seconds."""
    name = run_name(setting, seed, lr)
    run_dir = out / "runs" / name
    if run_dir.exists():  # an unfinished earlier attempt: start clean (metrics.jsonl appends)
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "async_pmd.launch", str(REPO / "configs" / "cluster.yaml"),
           *SETTINGS[setting][1],
           f"trainer.output_dir={out / 'runs'}", f"trainer.experiment_name={name}",
           f"trainer.total_steps={steps}", "trainer.save_freq=0", "trainer.resume=disable",
           "checkpoint.export_hf=false", "metrics.enabled=false",
           f"model.path={out / 'models' / f'tiny_s{seed}'}", f"model.tiny.seed={seed}",
           f"trainer.seed={seed}", f"data.seed={seed}", *([f"actor.lr={lr}"] if lr is not None else []), *extra]
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
        "zero_signal": np.array([r.get("groups/zero_signal", math.nan) for r in records], np.float64),
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


def _stats(values: list[float | None]) -> dict[str, float | None]:
    """Median, min and worst (max) over seeds; a seed that never reached counts as +inf, and an
    infinite result is None."""
    finite = [v for v in values if v is not None]
    if not finite:
        return {"median": None, "min": None, "worst": None}
    med = statistics.median([math.inf if v is None else v for v in values])
    return {"median": None if math.isinf(med) else med, "min": min(finite),
            "worst": max(finite) if len(finite) == len(values) else None}


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
                row[f"{unit}_to_{th}"] = _stats([None if h is None else h[j] for h in hits])
        finals = [float(r["reward"][-FINAL_STEPS:].mean()) for r in seeds]
        row["final_reward"] = float(np.mean(finals))
        row["final_reward_worst"] = float(min(finals))
        row["final_entropy"] = float(np.mean([np.nanmean(r["entropy"][-FINAL_STEPS:]) for r in seeds]))
        zero = [r["zero_signal"][-FINAL_STEPS:] for r in seeds if np.isfinite(r["zero_signal"]).any()]
        row["final_zero_signal"] = float(np.mean([np.nanmean(z) for z in zero])) if zero else None
        summary[setting] = row
    return summary


def _value(v: float | None, unit: str, never: str) -> str:
    if v is None:
        return never
    return f"{v / 1e3:,.0f} k" if unit == "samples" else f"{v:,.0f} s"


def _fmt(stat: dict, unit: str) -> str:
    if stat["min"] is None:
        return "–"
    return f"{_value(stat['median'], unit, '–')} / {_value(stat['worst'], unit, 'never')}"


def table_markdown(summary: dict[str, dict], window: int) -> str:
    head = ["setting", "seeds × steps"]
    for th in THRESHOLDS:
        head += [f"reached {th}", f"samples to {th}", f"seconds to {th}"]
    head += ["final reward (worst seed)", "final entropy", "final zero-signal groups"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary.values():
        cells = [row["label"], f"{row['seeds']} × {row['steps']:,}"]
        for th in THRESHOLDS:
            cells += [f"{row[f'reached_{th}']}/{row['seeds']}", _fmt(row[f"samples_to_{th}"], "samples"),
                      _fmt(row[f"seconds_to_{th}"], "seconds")]
        zero = "–" if row.get("final_zero_signal") is None else f"{row['final_zero_signal']:.2f}"
        cells += [f"{row['final_reward']:.3f} ({row['final_reward_worst']:.3f})", f"{row['final_entropy']:.3f}", zero]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Median / worst over seeds of the first step at which the reward, smoothed by a trailing "
                 f"{window}-step mean, reaches the threshold (a seed that never does counts as infinitely "
                 f"slow: \"never\" = some seed did not, \"–\" = no seed did). Final = mean of the last "
                 f"{FINAL_STEPS} steps, averaged over seeds (worst seed in brackets).")
    return "\n".join(lines) + "\n"


def best_lr(runs_by_lr: dict[float, list[dict[str, np.ndarray]]], window: int) -> float:
    """The rate whose sweep runs did best: most seeds reaching 0.9, then the fewest median samples
    to it (never = infinite), then the highest mean final reward."""
    def score(lr):
        row = summarize({"_": runs_by_lr[lr]}, window)["_"]
        median = row["samples_to_0.9"]["median"]
        return (-row["reached_0.9"], math.inf if median is None else median, -row["final_reward"])
    return min(runs_by_lr, key=score)


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
        line, = ax.plot(x / xscale, mean, linewidth=2, label=f"{labels[setting]} (n={len(runs[setting])})")
        ax.fill_between(x / xscale, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        for run in runs[setting]:  # each seed, so that a collapse is not averaged away
            ax.plot(run[x_key] / xscale, smooth(run[y_key], window), color=line.get_color(), linewidth=0.6,
                    alpha=0.6)
    ax.grid(alpha=0.3)


def plot(runs: dict[str, list[dict[str, np.ndarray]]], path: Path, window: int, title: str,
         labels: dict[str, str] | None = None) -> list[str]:
    """`labels` names each setting's lines (default: its SETTINGS label); returns the legends' entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {s: SETTINGS[s][0] if s in SETTINGS else s for s in runs} | (labels or {})
    # τ-panel names, keeping what `labels` adds to a setting's own (", lr 2e-4" of a swept one)
    tau_labels = {s: f"{'ploo_exact' if 'exact' in s else 'ploo'} + opmd, τ {t:g}"
                     f"{labels.get(s, '').removeprefix(SETTINGS[s][0])}" for s, t in TAU_SWEEP.items()}
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
    entries = []
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            entries += [text.get_text() for text in ax.legend(fontsize=8, loc="best").get_texts()]
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return entries


# ---------------------------------------------------------------- main


def collect(out: Path, settings: list[str], seeds: list[int], steps: int,
            lrs: dict[str, float | None] | None = None) -> dict[str, list[dict[str, np.ndarray]]]:
    """The runs that finished `steps` learner steps (one still running, or cut short, is left out);
    `lrs` names each setting's rate (None: the config's)."""
    runs: dict[str, list] = {}
    for setting in settings:
        for seed in seeds:
            run_dir = out / "runs" / run_name(setting, seed, (lrs or {}).get(setting))
            if completed_steps(run_dir) >= steps:
                runs.setdefault(setting, []).append(load_run(run_dir))
    return runs


def run_all(out: Path, settings: list[str], seeds: list[int], steps: int, extra: list[str],
            lrs: dict[str, float | None]) -> None:
    for seed in seeds:  # seed-major: a study cut short still has every setting
        for setting in settings:
            lr = lrs.get(setting)
            name = run_name(setting, seed, lr)
            if completed_steps(out / "runs" / name) >= steps:
                print(f"{name}: done already", flush=True)
                continue
            print(f"{name}: {launch(out, setting, seed, steps, extra, lr):.0f} s", flush=True)


def sweep(out: Path, args) -> dict[str, float]:
    """Each setting at each of `args.lrs` on the sweep seeds; returns the best rate per setting."""
    for lr in args.lrs:
        if not args.plot_only:
            run_all(out, args.settings, args.sweep_seeds, args.steps, args.overrides, dict.fromkeys(args.settings, lr))
    chosen, table = {}, {}
    for setting in args.settings:
        by_lr = {lr: collect(out, [setting], args.sweep_seeds, args.steps, {setting: lr}).get(setting, [])
                 for lr in args.lrs}
        by_lr = {lr: runs for lr, runs in by_lr.items() if runs}
        if not by_lr:
            continue
        chosen[setting] = best_lr(by_lr, args.window)
        table[setting] = {f"{lr:g}": summarize({"_": runs}, args.window)["_"] for lr, runs in by_lr.items()}
    lines = ["| setting | lr | sweep seeds | reached 0.9 | median samples to 0.9 | final reward | chosen |",
             "|---|---|---|---|---|---|---|"]
    for setting, rows in table.items():
        for lr, row in rows.items():
            median = row["samples_to_0.9"]["median"]
            lines.append(f"| {SETTINGS[setting][0]} | {lr} | {row['seeds']} | "
                         f"{row['reached_0.9']}/{row['seeds']} | {_value(median, 'samples', '–')} | "
                         f"{row['final_reward']:.3f} | {'yes' if float(lr) == chosen[setting] else ''} |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    (out / "sweep.json").write_text(json.dumps({"chosen": chosen, "runs": table}, indent=1))
    print("\n".join(lines))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="learner steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="sweep these learning rates on --sweep-seeds and report each setting at its best")
    parser.add_argument("--sweep-seeds", type=int, nargs="+", default=[100, 101])
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
    if args.lrs and set(args.seeds) & set(args.sweep_seeds):
        parser.error("--sweep-seeds must not be among the reported --seeds")
    chosen: dict[str, float] = sweep(out, args) if args.lrs else {}
    lrs = reported_lrs(chosen, config_value("actor.lr", args.overrides))
    if not args.plot_only:
        run_all(out, args.settings, args.seeds, args.steps, args.overrides, lrs)
    runs = collect(out, args.settings, args.seeds, args.steps, lrs)
    if not runs:
        print(f"no runs under {out / 'runs'}", file=sys.stderr)
        return 1
    summary = summarize(runs, args.window)
    for setting, lr in chosen.items():
        if setting in summary:
            summary[setting]["lr"] = lr
            summary[setting]["label"] += f", lr {lr:g}"
    table = table_markdown(summary, args.window)
    (out / "learning_study.md").write_text(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    seeds = sorted({len(v) for v in runs.values()})
    title = (f"configs/cluster.yaml: a+b= mod 10, tiny Qwen2, 32 prompts × 8 responses per step\n"
             f"seeds per setting {'/'.join(map(str, seeds))}; line = mean over seeds, band = min–max; "
             f"reward smoothed over {args.window} steps")
    plot(runs, out / "learning_study.png", args.window, title, {s: row["label"] for s, row in summary.items()})
    print(table)
    print(f"wrote {out / 'learning_study.png'}, {out / 'learning_study.md'}, {out / 'summary.json'}")
    if args.publish is not None:
        args.publish.mkdir(parents=True, exist_ok=True)
        for name in ("learning_study.png", "learning_study.md", "summary.json", *(("sweep.md", "sweep.json") if lrs else ())):
            shutil.copy2(out / name, args.publish / name)
        print(f"copied them to {args.publish}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
