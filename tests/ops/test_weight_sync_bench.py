"""ops/bench/weight_sync.py on a tiny setting, both loads and both parameter layouts: a row of
positive figures each, the transport, load and layout named above the table, and the parts the
put got (the head and one part for ZeRO-1/2's flat buffer, one per parameter otherwise)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("load, layout", [("adopt", "flat"), ("copy", "separate")])
def test_tiny_weight_sync_through_the_cli(load, layout):
    proc = subprocess.run([sys.executable, str(REPO / "ops" / "bench" / "weight_sync.py"), "--sizes", "tiny",
                           "--replicas", "2", "--repeats", "1", "--load", load, "--layout", layout],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"object_store, {load}, {layout} parameters, 2 replicas" in proc.stdout
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 1
    _, _, mb, parts, fresh, publish, pull, sync, memcpy, ratio, first, second = (c.strip() for c in rows[0])
    assert 0.2 < float(mb) < 0.4
    assert int(parts) == 2 if layout == "flat" else int(parts) > 20  # the tiny model has 26 tensors
    assert fresh.endswith("of 1")
    assert all(float(x) > 0 for x in (publish, pull, sync, memcpy, first, second))
    assert float(sync) >= float(publish)
    assert float(ratio.rstrip("x")) > 1  # the memcpy is printed rounded: the ratio is of the unrounded times
