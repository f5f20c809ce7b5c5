"""Scaling generators 1 → 3 → 1 while a job trains, through `python -m async_pmd.scale`.

The contract: replicas that are serving are never restarted (same replica id, same pid), a
replica added by scaling starts on the newest published weights and then serves, a scale-down
drains the replica it stops (no request re-issued, none failed), and the run's accounting
(dispatched = trained + filtered + stale + failed + unfinished) still holds when the job ends.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from background_job import REPO, BackgroundJob

pytestmark = pytest.mark.slow


def _by_id(replicas: list[dict]) -> dict[str, dict]:
    return {r["replica_id"]: r for r in replicas}


def _wait_until_serving(job: BackgroundJob, replica_ids: set[str], timeout_s: float = 120) -> dict:
    """The generators' status once every replica in `replica_ids` has served a request."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = job.scale("status")
        served = {r["replica_id"] for r in status["generators"] if (r.get("status") or {}).get("requests", 0) > 0}
        if replica_ids <= served:
            return status
        assert time.monotonic() < deadline, f"replicas {replica_ids - served} never served:\n{status}"
        time.sleep(2)


def test_scale_generators_up_and_down_while_training(tmp_path):
    # 6 logical CPUs: three 1-CPU generator replicas next to the learner (they
    # time-share the machine's cores; a fourth would be refused by `scale`, not left pending).
    job = BackgroundJob(tmp_path, "scaled", "metrics.enabled=false", "ray.num_cpus=6",
                        "trainer.total_steps=100000", "trainer.total_minutes=10", model_dir=tmp_path / "model")
    try:
        job.wait_for_steps(5)
        status = job.scale("status")
        (original,) = status["generators"]
        assert original["state"] == "RUNNING"
        # The demo's generators score its string reward themselves: no scorers to list or scale.
        assert "scorers" not in status
        refused = subprocess.run([sys.executable, "-m", "async_pmd.scale", "--run-dir", str(job.run_dir), "scorers", "2"],
                                 cwd=REPO, env=job.env, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "scorer.inline_builtin" in refused.stderr, refused.stderr

        # 1 → 3: the original keeps its process; the new ones start on the newest weights.
        published_before = job.scale("status")["published_version"]
        up = job.scale("generators", "3")
        assert len(up["generators"]) == 3 and all(r["state"] == "RUNNING" for r in up["generators"])
        kept = _by_id(up["generators"])[original["replica_id"]]
        assert kept["pid"] == original["pid"]
        new_ids = set(_by_id(up["generators"])) - {original["replica_id"]}
        for rid in new_ids:
            status = _by_id(up["generators"])[rid]["status"]
            assert status["start_version"] >= published_before > 0, status

        # The new replicas take traffic (Serve routes to them once their __init__ has returned).
        serving = _wait_until_serving(job, new_ids)
        assert _by_id(serving["generators"])[original["replica_id"]]["pid"] == original["pid"]
        for rid in new_ids:
            status = _by_id(serving["generators"])[rid]["status"]
            assert status["policy_version"] >= status["start_version"]

        # 3 → 1: Serve stops the newest replicas after draining them; the original stays.
        steps_before_down = job.records()[-1]["step"]
        (left,) = job.scale("generators", "1")["generators"]
        assert (left["replica_id"], left["pid"]) == (original["replica_id"], original["pid"])
        job.wait_for_steps(steps_before_down + 5)
    finally:
        code = job.stop()
    assert code == 0, job.log_tail()

    accounting = json.loads((job.run_dir / "accounting.json").read_text())
    settled = sum(accounting[f"groups/{k}"] for k in ("trained", "filtered", "stale", "failed", "unfinished"))
    assert accounting["groups/dispatched"] == settled, accounting
    # Nothing lost while replicas came and went: no request re-issued, no group failed.
    assert accounting["groups/reissued_requests"] == 0 and accounting["groups/failed"] == 0, accounting
    for record in job.records():
        if "groups/dispatched" in record:
            assert record["groups/dispatched"] == sum(
                record[f"groups/{k}"] for k in ("trained", "filtered", "stale", "failed", "unfinished")), record
