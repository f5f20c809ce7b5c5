"""ops/bench/ray_call_cost.py on a tiny setting: both loops of each payload print a row, with
the callee's CPU only for the actor call, and the idle line prints."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_call_cost_through_the_cli():
    proc = subprocess.run([sys.executable, str(REPO / "ops" / "bench" / "ray_call_cost.py"), "--calls", "30",
                           "--payload-bytes", "0", "1000", "--idle-s", "0.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| local") or line.startswith("| actor")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("local coroutine (baseline)", "0"), ("actor call", "0"), ("local coroutine (baseline)", "1,000"), ("actor call", "1,000")]
    for name, _, wall, caller, callee, both in rows:
        assert float(wall) > 0 and float(both) >= float(caller) >= 0
        assert (callee.strip() == "–") == name.startswith(" local")
    assert re.search(r"an idle actor process: [\d.]+ CPU ms per second", proc.stdout)
