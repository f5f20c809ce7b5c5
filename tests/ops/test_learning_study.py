"""ops/bench/learning_study.py: the smoothing, the samples/seconds-to-threshold table (median and
min over seeds, seeds that never get there counted as infinitely slow) worked out by hand, and a
tiny real study (one setting swept on one seed, reported on another, a few steps) through the CLI."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "ops" / "bench" / "learning_study.py"

_spec = importlib.util.spec_from_file_location("learning_study", SCRIPT)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def fake_run(rewards, samples_per_step=256, seconds_per_step=0.1, entropy=1.0, zero_signal=0.5) -> dict:
    steps = np.arange(1, len(rewards) + 1)
    return {"step": steps, "samples": steps * float(samples_per_step), "seconds": steps * seconds_per_step,
            "reward": np.asarray(rewards, np.float64), "entropy": np.full(len(rewards), entropy),
            "zero_signal": np.full(len(rewards), zero_signal)}


def test_smooth_is_a_trailing_mean():
    """window 2 over 0 1 2 3: the first point alone, then pairs: 0, .5, 1.5, 2.5."""
    np.testing.assert_allclose(study.smooth(np.array([0.0, 1, 2, 3]), 2), [0, 0.5, 1.5, 2.5])
    np.testing.assert_allclose(study.smooth(np.array([4.0, 2]), 10), [4, 3])
    with pytest.raises(ValueError):
        study.smooth(np.array([1.0]), 0)


def test_first_reaching_uses_the_smoothed_reward():
    """Raw rewards 0 1 1 1, window 2 -> 0 .5 1 1: 0.8 is first reached at step 3 (768 samples,
    0.3 s), although the raw reward touched 1 at step 2."""
    run = fake_run([0, 1, 1, 1])
    assert study.first_reaching(run, 0.8, 2) == (768.0, pytest.approx(0.3))
    assert study.first_reaching(run, 0.8, 1) == (512.0, pytest.approx(0.2))
    assert study.first_reaching(run, 1.5, 2) is None


def test_summary_median_and_worst_over_seeds():
    """Three seeds reach 0.8 at steps 2, never, 4 (window 1): sorted samples 512, 1024, inf ->
    median 1024, min 512, worst "never" (a seed did not get there), 2/3 reached. 0.9 only by one
    seed: median inf -> None. Two seeds that both reach: worst is the slower one."""
    runs = {"ploo": [fake_run([0, 0.85, 0.95]), fake_run([0, 0, 0, 0]), fake_run([0, 0, 0, 0.8])]}
    row = study.summarize(runs, window=1)["ploo"]
    assert row["reached_0.8"] == 2 and row["seeds"] == 3 and row["steps"] == 3
    assert row["samples_to_0.8"] == {"median": 1024.0, "min": 512.0, "worst": None}
    assert row["seconds_to_0.8"]["median"] == pytest.approx(0.4)
    assert row["reached_0.9"] == 1 and row["samples_to_0.9"] == {"median": None, "min": 768.0, "worst": None}
    assert row["final_reward_worst"] == pytest.approx(0.0) and row["final_zero_signal"] == pytest.approx(0.5)
    table = study.table_markdown(study.summarize(runs, window=1), window=1)
    assert "| ploo + opmd (τ 1) | 3 × 3 | 2/3 | 1 k / never |" in table
    assert "| 1/3 | – / never |" in table
    both = study.summarize({"ploo": [fake_run([0, 0.85]), fake_run([0, 0, 0, 0.9])]}, window=1)["ploo"]
    assert both["samples_to_0.8"] == {"median": 768.0, "min": 512.0, "worst": 1024.0}


def test_best_lr_prefers_reaching_then_speed_then_final_reward():
    fast, slow, never = fake_run([0, 0.95]), fake_run([0, 0, 0, 0.95]), fake_run([0, 0.5, 0.6])
    assert study.best_lr({1e-4: [slow, slow], 3e-4: [fast, never]}, window=1) == 1e-4  # 2/2 beats 1/2
    assert study.best_lr({1e-4: [slow, slow], 3e-4: [fast, fast]}, window=1) == 3e-4  # then fewer samples
    assert study.best_lr({1e-4: [fake_run([0, 0.5])], 3e-4: [never]}, window=1) == 3e-4  # then final reward


def test_plot_writes_a_small_png(tmp_path):
    runs = {s: [fake_run(np.linspace(0, 0.9, 300)), fake_run(np.linspace(0, 0.8, 280))]
            for s in ("ploo", "rloo", "grpo", "ploo_tau0.1", "ploo_tau0.01")}
    entries = study.plot(runs, tmp_path / "p.png", window=20, title="test", labels={"ploo": "ploo + opmd (τ 1), lr 0.0002"})
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "p.png").stat().st_size < 200_000
    # a swept setting is named with its rate, in the estimator panels and in the τ panel
    assert entries.count("ploo + opmd (τ 1), lr 0.0002 (n=2)") == 3 and "ploo + opmd, τ 1, lr 0.0002 (n=2)" in entries
    assert "rloo + opmd (n=2)" in entries and "ploo + opmd, τ 0.1 (n=2)" in entries


@pytest.mark.slow
def test_tiny_study_through_the_cli(tmp_path):
    """One setting swept over a learning rate on a sweep seed, then reported on another seed at
    the chosen rate, a few steps each: real runs of the demo config, then the plot, the tables and
    the summary; a second call finds the runs done and only redraws. (The choice among several
    rates is `best_lr`'s, tested above.)"""
    args = [sys.executable, str(SCRIPT), "--steps", "3", "--seeds", "0", "--settings", "ploo",
            "--lrs", "3e-4", "--sweep-seeds", "7", "--window", "2", "--out", str(tmp_path)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sorted(sweep["runs"]["ploo"]) == ["0.0003"] and sweep["chosen"]["ploo"] == 3e-4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary) == ["ploo"] and summary["ploo"]["steps"] == 3 and summary["ploo"]["lr"] == 3e-4
    assert (tmp_path / "runs" / "ploo_lr0.0003_s7" / "metrics.jsonl").is_file()  # the sweep run
    assert (tmp_path / "runs" / "ploo_lr0.0003_s0" / "metrics.jsonl").is_file()  # the reported one
    config = yaml.safe_load((tmp_path / "runs" / "ploo_lr0.0003_s0" / "config.yaml").read_text())
    assert config["actor"]["lr"] == 3e-4 and config["data"]["seed"] == 0 and config["trainer"]["seed"] == 0
    assert (tmp_path / "learning_study.png").stat().st_size < 200_000
    assert "ploo + opmd (τ 1), lr 0.0003" in (tmp_path / "learning_study.md").read_text()
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already") == 2
    refused = subprocess.run([*args[:5], "7", *args[6:]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "must not be among the reported" in refused.stderr


def test_a_sweep_choosing_the_configs_own_rate_reports_the_plain_runs():
    assert study.reported_lrs({"ploo": 1e-4, "grpo": 2e-4}, config_lr=1e-4) == {"ploo": None, "grpo": 2e-4}
    assert study.run_name("ploo", 3, None) == "ploo_s3" and study.run_name("grpo", 3, 2e-4) == "grpo_lr0.0002_s3"


def test_config_value_reads_the_demo_config_under_the_overrides():
    assert study.config_value("actor.lr", []) == 1e-4  # configs/cluster.yaml
    assert study.config_value("actor.lr", ["actor.lr=3e-4", "data.seed=1"]) == 3e-4
    assert study.config_value("actor.lr", ["actor.lr=3e-4", "actor.lr=2e-4"]) == 2e-4  # the last one wins
