"""ops/bench/coordination_floor.py: which py-spy samples count as ours (worked out by hand on a
written profile), which threads are Python's, and the whole benchmark on a tiny setting (the
real job, real py-spy), whose floor must lie under the measured share."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "ops" / "bench" / "coordination_floor.py"

_spec = importlib.util.spec_from_file_location("coordination_floor", SCRIPT)
floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(floor)

_OURS_THEN_NUMPY = ("Thread.run (threading.py:982);GroupBuffer.put (services/buffer.py:70);"
                    "GroupStore.put (async_pmd/grouping.py:120);unique (numpy/lib/_arraysetops_impl.py:280) 5")
_OURS_CALLS_RAY = ("Thread.run (threading.py:982);RolloutDriver._put_scored (services/driver.py:307);"
                   "ActorMethod.remote (ray/actor.py:945);flatten_args (ray/_common/signature.py:130) 3")
_RAY_CALLS_OURS = ("Worker.main_loop (ray/_private/worker.py:946);"
                   "RolloutDriver.status (services/driver.py:140) 2")
_STDLIB_ONLY = "Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982) 7"
_SERVE_ROUTER = "Thread.run (threading.py:982);AsyncioRouter.assign_request (ray/serve/_private/router.py:600) 4"
_ABSOLUTE_PATH = f"main (x.py:1);WeightStore.publish ({REPO}/services/weights.py:50) 1"


def test_a_sample_is_ours_when_the_innermost_repo_or_ray_frame_is_ours(tmp_path):
    raw = tmp_path / "p.txt"
    raw.write_text("\n".join([_OURS_THEN_NUMPY, _OURS_CALLS_RAY, _RAY_CALLS_OURS, _STDLIB_ONLY, _SERVE_ROUTER,
                              _ABSOLUTE_PATH, ""]))
    total, ours, where = floor.ours_share(raw)
    assert total == 5 + 3 + 2 + 7 + 4 + 1
    assert ours == 5 + 2 + 1  # numpy under our frame is ours; Ray under our frame is Ray's
    assert where["GroupStore.put (async_pmd/grouping.py)"] == 5
    assert where["RolloutDriver.status (services/driver.py)"] == 2
    assert where["WeightStore.publish (services/weights.py)"] == 1


@pytest.mark.parametrize("name, python", [("ray::GroupBuffe", True), ("ray::IDLE", True), ("python", True),
                                          ("worker.io", False), ("client.poll0", False), ("task_event_buff", False)])
def test_python_threads_carry_the_process_title(name, python):
    assert floor.is_python_thread(name) is python


@pytest.mark.slow
def test_tiny_floor_through_the_cli(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "2000", "--warmup-s", "1", "--window-s", "5",
                           "--rate", "50", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r[0].strip(): [c.strip() for c in r[1:]] for r in
            (line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line)}
    for role in ("RolloutDriver", "GroupBuffer", "WeightStore", "launcher", "ServeController"):
        cpu, native, samples, share, ours = rows[role]
        assert float(cpu) > 0 and 0 <= float(native.rstrip("%")) <= 100, (role, rows[role])
        assert 0 <= float(share.rstrip("%")) <= 100 and 0 <= float(ours) <= float(cpu)
        # the busiest two are sampled in any window; the others may be idle for all of a short one
        assert int(samples) > 0 or role not in ("RolloutDriver", "GroupBuffer"), (role, rows[role])
    assert rows["LearnerRank"][2:] == ["–", "–", "–"]  # not a coordination actor: not profiled
    measured = float(re.search(r"coordination over the window: ([\d.]+)%", proc.stdout).group(1))
    low = float(re.search(r"floor \(our code in coordination at zero\): ([\d.]+)%", proc.stdout).group(1))
    assert 0 < low <= measured
