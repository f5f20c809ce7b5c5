"""ops/bench/bench_algos.py stays runnable, and its loop implementations agree with the library."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "ops" / "bench" / "bench_algos.py"


def test_bench_runs_and_agrees_at_small_size():
    """The bench exits 0 (it exits non-zero when a loop implementation disagrees) and prints its table."""
    out = subprocess.run(
        [sys.executable, str(BENCH), "--prompts", "8", "--n", "4", "--tokens", "8", "--repeats", "1", "--loop-repeats", "1"],
        capture_output=True, text=True, timeout=120, cwd=BENCH.parents[2],
    )
    assert out.returncode == 0, out.stderr
    assert "| vectorised |" in out.stdout and "all three agree" in out.stdout
