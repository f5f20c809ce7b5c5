"""The whole job with a real engine in the generator replica (`configs/cluster_<engine>.yaml`, run as
`python -m async_pmd.launch` in a subprocess of this venv), with the replica SIGKILLed while
the run is under way.

Contracts pinned: the run completes every step; requests the dead replica held are re-issued
by the driver, none lost and none counted twice (`groups/dispatched == trained + filtered +
stale + failed + unfinished` on every record, no duplicates); the replacement replica loads the
newest weights through the engine's API and keeps loading each step's, so generation follows
the learner. SGLang's job syncs weights over the collective (`weight_sync.transport=collective`:
the replica opens a gloo group with learner rank 0 and receives every tensor by broadcast through
SGLang's `update_weights_from_distributed`; the replacement replica opens a new one), vLLM's
through the object store. Each engine's case runs only in that engine's venv and skips, with the
reason, elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from engine_checks import needs

REPO = Path(__file__).resolve().parents[2]
STEPS = 30
KILL_AT_STEP = 6
MAX_KILLS = 3  # a kill can land while the driver waits on backpressure, the replica holding nothing
REPLICA_TITLE = "ServeReplica:generator:Generator"  # Ray's process title of a Serve replica
TRANSPORT = {"sglang": ["weight_sync.transport=collective"], "vllm": []}


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _replicas(proc: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in proc.children(recursive=True):
        try:
            if REPLICA_TITLE in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def _kill_while_generating(job: subprocess.Popen) -> int:
    """SIGKILL the replica at a moment it is using the CPU (generating, most likely): a replica
    killed while the driver waits on backpressure held no request, and nothing is re-issued."""
    (replica,) = _replicas(psutil.Process(job.pid))
    before = sum(replica.cpu_times()[:2])
    for _ in range(500):
        time.sleep(0.01)
        now = sum(replica.cpu_times()[:2])
        if now - before >= 0.008:
            break
        before = now
    os.kill(replica.pid, signal.SIGKILL)
    return replica.pid


def _run_with_kills(kind: str, tmp_path: Path) -> tuple[list[dict], list[dict], dict]:
    """Kill the replica at step KILL_AT_STEP, and again (up to MAX_KILLS) while no kill has
    caught a request on it: the driver's `driver/retries` in the records says when one did."""
    run_dir = tmp_path / "runs" / "job"
    cmd = [sys.executable, "-m", "async_pmd.launch", str(REPO / "configs" / f"cluster_{kind}.yaml"),
           f"trainer.output_dir={tmp_path / 'runs'}", "trainer.experiment_name=job", f"model.path={tmp_path / 'tiny64'}",
           f"trainer.total_steps={STEPS}", "trainer.total_minutes=null", "trainer.save_freq=0",
           "checkpoint.export_hf=false", "metrics.enabled=false", *TRANSPORT[kind]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_for_step(step: int) -> list[dict]:
        deadline = time.monotonic() + 400
        while len(records := _records(run_dir)) < step:
            assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the job never reached step {step}"
            time.sleep(0.2)
        return records

    kills: list[dict] = []
    try:
        step = KILL_AT_STEP
        while len(kills) < MAX_KILLS:
            retries_before = wait_for_step(step)[-1]["driver/retries"]
            pid = _kill_while_generating(job)
            step = len(_records(run_dir))
            records = wait_for_step(step + 3)  # a replacement replica is serving
            kills.append({"step": step, "pid": pid, "reissued": records[-1]["driver/retries"] - retries_before})
            if kills[-1]["reissued"] > 0:
                break
            step += 3
        assert job.wait(timeout=600) == 0, (tmp_path / "job.log").read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    return kills, _records(run_dir), json.loads((run_dir / "accounting.json").read_text())


@pytest.fixture(scope="module", params=["sglang", "vllm"])
def job(request, tmp_path_factory):
    kind = request.param
    needs_kind = needs(kind)
    if needs_kind.args[0]:  # the skipif condition: the engine is not installed in this venv
        pytest.skip(needs_kind.kwargs["reason"])
    return (kind, *_run_with_kills(kind, tmp_path_factory.mktemp(f"job_{kind}")))


@pytest.mark.timeout(900)
def test_a_killed_replica_is_replaced_and_its_requests_reissued_with_nothing_lost(job):
    kind, kills, records, accounting = job
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        settled = sum(record[f"groups/{k}"] for k in ("trained", "filtered", "stale", "failed", "unfinished"))
        assert record["groups/dispatched"] == settled, record
        assert record["groups/duplicate"] == 0, record
    assert kills[-1]["reissued"] >= 1, kills  # a dead replica held work in flight
    assert accounting["groups/failed"] == 0, accounting  # and every re-issue then succeeded
    assert accounting["generator"]["pid"] not in {k["pid"] for k in kills}  # a new replica served the rest


@pytest.mark.timeout(900)
def test_the_new_replica_loads_each_steps_weights_through_the_engine(job):
    kind, kills, records, accounting = job
    generator = accounting["generator"]
    # The replacement started on the newest published weights and pulled nearly every later step's.
    assert generator["start_version"] >= kills[-1]["step"] - 1, generator
    assert generator["weight_pulls"] >= (STEPS - generator["start_version"]) // 2, generator
    assert generator["policy_version"] >= STEPS - 2, generator
    assert generator["weight_transport"] == ("collective" if kind == "sglang" else "object_store"), generator
    sync_ms = 1e3 * generator["weight_pull_s"] / max(generator["weight_pulls"], 1)
    print(f"{kind}: {generator['weight_pulls']} weight loads after the kill, {sync_ms:.1f} ms each; "
          f"{accounting['driver/retries']} requests re-issued")
