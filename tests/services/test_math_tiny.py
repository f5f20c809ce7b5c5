"""configs/math_tiny.yaml end to end through the real CLI, shortened: grade-school problems
graded by math-verify run, validate (before training and every test_freq steps), reset the
optimizer on the seed's key, and export the final policy."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_math_tiny_runs_validates_resets_and_exports(tmp_path):
    steps = 6
    cmd = [sys.executable, "-m", "async_pmd.launch", str(REPO / "configs" / "math_tiny.yaml"),
           f"trainer.output_dir={tmp_path}", f"model.path={tmp_path / 'tiny'}", "metrics.enabled=false",
           f"trainer.total_steps={steps}", "trainer.test_freq=3", "trainer.save_freq=0",
           "+actor_rollout_ref.actor.reset_optimizer_states_freq=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "math_tiny"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    # A validation before training (its own record at step 0), then one per learner step.
    assert [r["step"] for r in records] == [0, *range(1, steps + 1)]
    val = {r["step"]: r for r in records if "val/reward/mean" in r}
    assert sorted(val) == [0, 3, 6]
    for step, r in val.items():
        assert r["val/prompts"] == 50 and r["val/n"] == 4  # gsm_tiny's held-out split, val_kwargs.n
        assert r["val/policy_version"] == step
        assert -1.0 <= r["val/reward/mean"] <= 1.0 and 0.0 <= r["val/pass@n"] <= 1.0
        assert r["val/reward_failures"] == 0  # math-verify scored every response
    # Every 2 learner steps the optimizer was reset (counted by the learner).
    assert [r["actor/optimizer_resets"] for r in records[1:]] == [s // 2 for s in range(1, steps + 1)]
    # The overlong penalty is on (responses of 8 tokens, buffer 4): rewards go below 0.
    assert min(r["reward/mean"] for r in records[1:]) < 0
    # The progress line shows the latest validation reward.
    assert "validation at step 0" in proc.stdout
    assert all(" val " in line for line in proc.stdout.splitlines() if line.startswith("step "))
    assert (run / "final_hf" / "model.safetensors").is_file()
    assert records[-1]["groups/trained"] == steps * 16
