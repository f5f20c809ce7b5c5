"""A real two-node Ray cluster on this machine: a head and a second raylet started with
`ray start` (both on 127.0.0.1, token auth on every process, as Ray 2.60 requires), the job run
against it with `ray.address`, generator replicas on both nodes, learning and accounting as in
the single-node run. The cluster's processes are stopped by pid at the end (`ray stop` would
stop every Ray on the machine)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from async_pmd.ports import find_free_port
from background_job import BackgroundJob

pytestmark = pytest.mark.slow

RAY = str(Path(os.sys.executable).with_name("ray"))


def _ray_env() -> dict:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # it makes a head refuse a second node
    return env


@pytest.fixture
def two_nodes():
    temp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = find_free_port()
    env = _ray_env()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                       env=env, check=True, capture_output=True, text=True, timeout=180)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *common[:2]],
                       env=env, check=True, capture_output=True, text=True, timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        _stop_cluster(port, temp)


def _stop_cluster(port: int, temp: str) -> None:
    """SIGKILL the processes of this cluster only: those whose command line names its GCS port
    or its temp dir, and their children."""
    mine = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"127.0.0.1:{port}" in cmd or temp in cmd or f"--port={port}" in cmd:
            mine.append(p)
    for p in mine:
        try:
            for child in p.children(recursive=True):
                child.send_signal(signal.SIGKILL)
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    time.sleep(1)
    shutil.rmtree(temp, ignore_errors=True)


def test_the_job_runs_on_a_two_node_cluster(tmp_path, two_nodes):
    job = BackgroundJob(tmp_path, "two_nodes", f"ray.address={two_nodes}", "generator.num_replicas=2",
                        "trainer.total_steps=600", "trainer.total_minutes=null", "metrics.enabled=false",
                        model_dir=tmp_path / "tiny", env=_ray_env())
    try:
        job.wait_for_steps(20, timeout_s=600)
        status = job.scale("status")
        nodes = {r["node_id"] for r in status["generators"] if r["state"] == "RUNNING"}
        assert len(status["generators"]) == 2 and len(nodes) == 2, status  # one replica per node
        assert job.proc.wait(900) == 0, job.log_tail()
    finally:
        job.stop()
    records = [r for r in job.records() if "timing/step_s" in r]
    assert [r["step"] for r in records] == list(range(1, 601))
    for r in records:
        settled = sum(r[f"groups/{k}"] for k in ("trained", "filtered", "stale", "failed", "unfinished"))
        assert r["groups/dispatched"] == settled
    first = sum(r["reward/mean"] for r in records[:50]) / 50
    last = sum(r["reward/mean"] for r in records[-50:]) / 50
    # Learning, as on one node: from chance (~0.004) it rises steadily (a 400-step run here went
    # 0.0008 -> 0.0122 over its first and last 50 steps).
    assert first < 0.01 and last > 0.02, (first, last)
