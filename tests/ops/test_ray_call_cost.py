"""ops/bench/ray_call_cost.py on a tiny setting: every loop of each payload prints a row (with
`--serve`, the two Serve requests too), with the callee's CPU for all but the local baseline, and
the idle line prints."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_call_cost_through_the_cli():
    proc = subprocess.run([sys.executable, str(REPO / "ops" / "bench" / "ray_call_cost.py"), "--calls", "30",
                           "--payload-bytes", "0", "1000", "--idle-s", "0.5", "--serve"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if line.startswith(("| local", "| actor", "| Serve"))]
    loops = ["local coroutine (baseline)", "actor call", "Serve request by actor call (Serve's default)",
             "Serve request by the replica's gRPC (the driver's)"]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [(loop, size) for size in ("0", "1,000") for loop in loops]
    for name, _, wall, caller, callee, both in rows:
        assert float(wall) > 0 and float(both) >= float(caller) >= 0
        assert (callee.strip() == "–") == name.startswith(" local")
    assert re.search(r"an idle actor process: [\d.]+ CPU ms per second", proc.stdout)
