"""ops/bench/overhead.py: naming the job's processes by role from Ray's process titles, the
smoothed first-reaching step worked out by hand, and the whole benchmark on a tiny setting (a few
steps of the reference loop and of the real job, through the CLI)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "ops" / "bench" / "overhead.py"

_spec = importlib.util.spec_from_file_location("overhead", SCRIPT)
overhead = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overhead)


@pytest.mark.parametrize("cmdline, role", [
    (["ray::RolloutDriver.run", "", ""], "RolloutDriver"),
    (["ray::GroupBuffer", "", ""], "GroupBuffer"),
    (["ray::ServeReplica:scorer:RewardScorer.handle_request_with_rejection", ""], "RewardScorer"),
    (["ray::SERVE_REPLICA::generator#Generator#3vo9dy3b:ServeReplica:generator:Generator.__init__"], "Generator"),
    (["ray::DashboardAgent", "", ""], "DashboardAgent"),
    # the raylet's arguments name the worker script; a starting worker's name the raylet
    (["/v/ray/core/src/ray/raylet/raylet", "--python_worker_command=python default_worker.py"], "raylet"),
    (["/v/bin/python", "/v/ray/_private/workers/default_worker.py", "--raylet-name=/tmp/raylet"],
     "ray worker (starting)"),
    (["/v/bin/python", "-u", "/v/ray/autoscaler/_private/monitor.py"], "autoscaler monitor"),
])
def test_role_of_names_each_process_by_its_title(cmdline, role):
    assert overhead.role_of(cmdline, is_root=False) == role


def test_the_root_process_is_the_launcher():
    assert overhead.role_of(["/v/bin/python", "-m", "async_pmd.launch"], is_root=True) == "launcher"


def test_first_reaching_uses_the_trailing_mean():
    """Rewards 0 1 1 1, window 2 -> trailing means 0 .5 1 1: 0.8 first at step 3; window 1 at
    step 2; never above 1."""
    rewards = np.array([0.0, 1, 1, 1])
    assert overhead.first_reaching(rewards, 0.8, 2) == 3
    assert overhead.first_reaching(rewards, 0.8, 1) == 2
    assert overhead.first_reaching(rewards, 1.5, 2) is None
    assert overhead.first_reaching(np.array([]), 0.5, 2) is None


@pytest.mark.slow
def test_tiny_benchmark_through_the_cli(tmp_path):
    """A few steps of each: the tables print, and the summary has the CPU of the job's real
    actors, both rates and their ratio, the start-up time and the per-step timings."""
    args = [sys.executable, str(SCRIPT), "--steps", "4", "--ref-steps", "3", "--window", "2",
            "--out", str(tmp_path)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for role in ("launcher", "LearnerRank", "Generator", "RolloutDriver", "GroupBuffer", "WeightStore"):
        assert summary["cpu_s"][role] > 0, (role, summary["cpu_s"])
    assert summary["job"]["steps"] == 4 and summary["reference"]["steps"] == 3
    assert summary["samples_s_ratio"] == pytest.approx(
        summary["job"]["samples_s"] / summary["reference"]["samples_s"])
    assert 0 < summary["coordination_share"] < 1
    assert summary["startup_s"] > 0
    # Where the start-up went: the processes seen before the first step, each with its CPU then.
    for role in ("launcher", "LearnerRank", "Generator", "ServeController"):
        assert summary["startup_cpu_s"][role] > 0, (role, summary["startup_cpu_s"])
        assert 0 <= summary["startup_seen_s"][role] < summary["startup_s"], (role, summary["startup_seen_s"])
    assert summary["startup_seen_s"]["launcher"] <= min(summary["startup_seen_s"].values())
    assert "CPU s until the first step" in proc.stdout
    assert summary["timings_ms"]["timing/train_s"] > 0
    assert "| **coordination**" in proc.stdout and "job / reference" in proc.stdout
