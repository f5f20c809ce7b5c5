"""ops/bench/collapse_screen.py: the prompt split worked out by hand, and the screen on a tiny
setting through its CLI (a few steps of the reference loop), with and without the band filter."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "ops" / "bench" / "collapse_screen.py"

_spec = importlib.util.spec_from_file_location("collapse_screen", SCRIPT)
screen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(screen)


def test_prompt_split_counts_solved_dead_and_mixed_prompts_of_the_last_steps():
    """Step 1 is outside the window of 2. In steps 2-3: "a" right 2/2 (solved), "b" 0/2 (dead),
    "c" 1/2 (mixed), "d" 0.96 mean (solved: >= 0.95), "e" 0.04 (dead: <= 0.05)."""
    records = [{"groups": [["a", 0.0], ["b", 1.0], ["z", 0.5]]},
               {"groups": [["a", 1.0], ["b", 0.0], ["c", 1.0], ["d", 0.92], ["e", 0.08]]},
               {"groups": [["a", 1.0], ["b", 0.0], ["c", 0.0], ["d", 1.0], ["e", 0.0]]}]
    assert screen.prompt_split(records, 2) == {"solved": 2, "dead": 2, "mixed": 1}
    assert screen.prompt_split([{"groups": []}], 1) == {"solved": None, "dead": None, "mixed": None}


def _run(tmp_path, name, *args):
    cmd = [sys.executable, str(SCRIPT), "--name", name, "--seeds", "0", "--jobs", "1", "--out", str(tmp_path), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    return json.loads((tmp_path / f"{name}_s0.json").read_text())["records"], proc.stdout


@pytest.mark.slow
def test_tiny_screen_through_the_cli(tmp_path):
    """Three steps: one record per step with its reward, entropy, zero-signal share, the responses
    sampled so far (one batch of 32 × 8 per step) and every group's prompt; the table prints."""
    records, out = _run(tmp_path, "tiny", "--steps", "3", "--window", "2")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["generated"] for r in records] == [256, 512, 768]
    assert all(len(r["groups"]) == 32 and 0 <= r["reward"] <= 1 and r["entropy"] > 0 for r in records)
    assert "tiny: 0/1 seeds reached 0.9" in out and (tmp_path / "tiny.md").is_file()


@pytest.mark.slow
def test_band_drop_samples_until_a_batch_is_in_band_and_stops_at_the_budget(tmp_path):
    """Under the (0, 1) band at chance (~0.4% of responses right) nearly every group is all wrong
    and dropped, so a step of 4 groups samples batch after batch of 4 × 8 until 4 in-band groups
    are held; the budget of 12,000 responses ends the run long before its 50 steps."""
    records, _ = _run(tmp_path, "drop", "--steps", "50", "--max-generated", "12000", "data.train_batch_size=4",
                      "generator.prompts_per_request=4",
                      "algorithm.partition_reward_lb=0", "algorithm.partition_reward_ub=1",
                      "algorithm.band_filter=drop")
    assert 1 <= len(records) < 50
    assert all(r["zero_signal"] == 0 for r in records)  # only groups in band were trained
    assert records[-1]["generated"] > 4 * 32 * len(records)  # on average more than 4 batches a step
    assert records[-1]["generated"] <= 12000
