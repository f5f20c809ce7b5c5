"""Nothing lost, proven per prompt: the launcher SIGKILLed (its whole process group) or stopped
with Ctrl-C at different moments, resumed with `trainer.resume=auto` each time, and then
`python -m async_pmd.audit` checks the fate of every prompt the data cursor passed (trained once
at a step, filtered, stale, failed, or pending in the checkpoint) and that metrics.jsonl holds
each step once. Also: a cluster too small for the job fails fast, naming the shortfall; two
synchronous runs with the same seed write the same learning columns, another seed does not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from background_job import REPO, BackgroundJob

pytestmark = pytest.mark.slow

STEPS = 40
SAVE_FREQ = 5
COMMON = (f"trainer.total_steps={STEPS}", f"trainer.save_freq={SAVE_FREQ}", "trainer.total_minutes=null",
          "metrics.enabled=false", "trainer.resume=auto", "buffer.max_staleness=1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model") / "tiny"


def audit(run_dir: Path) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "async_pmd.audit", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def kill_group(job: BackgroundJob) -> None:
    os.killpg(job.proc.pid, signal.SIGKILL)
    job.proc.wait(30)


def wait_until(predicate, job: BackgroundJob, timeout_s: float = 300.0, poll_s: float = 0.005) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert job.proc.poll() is None, f"the job exited ({job.proc.returncode}):\n{job.log_tail()}"
        assert time.monotonic() < deadline, f"timed out:\n{job.log_tail()}"
        time.sleep(poll_s)


def last_step(job: BackgroundJob) -> int:
    records = [r for r in job.records() if "timing/step_s" in r]
    return records[-1]["step"] if records else 0


# Where each kill lands: a predicate on the running job, polled every 5 ms, then SIGKILL. The
# moments are read from outside (the metrics file, the checkpoint directory), so they are
# approximate: a step's phases last milliseconds on the tiny model.
def _early(job):  # the first learner step is logged
    return last_step(job) >= 1


def _mid_step(job):  # a step was just logged: the next one is being taken and trained
    return last_step(job) >= 7


def _checkpoint_write(job):  # a checkpoint directory is being written
    return any(job.run_dir.glob("checkpoints/step_*.tmp"))


def _weight_publish(job):  # a step ends with train then publish: its record is written just after
    return last_step(job) >= 23


def _final_drain(job):  # the last step is logged: the job drains and writes its final checkpoint
    return last_step(job) >= STEPS


MOMENTS = [_early, _mid_step, _checkpoint_write, _weight_publish, _final_drain]


def test_sigkill_at_five_moments_then_resume_loses_nothing(tmp_path, model_dir):
    """The whole launcher process group is SIGKILLed at five moments; each time the run resumes
    from its last complete checkpoint, and at the end the audit finds every prompt's fate
    recorded once, none lost, none trained twice, and every step once in metrics.jsonl."""
    killed_at = []
    for moment in MOMENTS:
        job = BackgroundJob(tmp_path, "killed", *COMMON, model_dir=model_dir, new_session=True)
        wait_until(lambda: moment(job), job)
        kill_group(job)
        killed_at.append((moment.__name__, last_step(job)))
        if any(job.run_dir.glob("checkpoints/step_*/trainer_state.json")):
            rc, report = audit(job.run_dir)  # the surviving checkpoint is consistent on its own
            assert rc == 0, (moment.__name__, report)
    job = BackgroundJob(tmp_path, "killed", *COMMON, model_dir=model_dir, new_session=True)
    assert job.proc.wait(600) == 0, job.log_tail()
    rc, report = audit(job.run_dir)
    assert rc == 0, (killed_at, report)
    assert f"step {STEPS}" in report and f"trained {STEPS * 32}" in report, report
    records = [r for r in job.records() if "timing/step_s" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), killed_at
    assert all(r["staleness/max"] <= 1 for r in records)  # the bound holds across every resume


def test_ctrl_c_at_any_point_leaves_an_auditable_checkpoint(tmp_path, model_dir):
    """Ctrl-C early, mid-run and during a checkpoint write: the job finishes the step in flight,
    drains and checkpoints; each checkpoint's audit passes (a batch taken but not
    trained is pending there, not trained), and the resumed run ends with every step once."""
    for moment in (_early, _mid_step, _checkpoint_write):
        job = BackgroundJob(tmp_path, "stopped", *COMMON, model_dir=model_dir)
        wait_until(lambda: moment(job), job)
        assert job.stop() == 0, job.log_tail()
        rc, report = audit(job.run_dir)
        assert rc == 0, (moment.__name__, report)
        state = json.loads(sorted(job.run_dir.glob("checkpoints/step_*/trainer_state.json"),
                                  key=lambda p: int(p.parent.name.removeprefix("step_")))[-1].read_text())
        assert state["step"] == last_step(job)  # the checkpoint is of the last logged step
    job = BackgroundJob(tmp_path, "stopped", *COMMON, model_dir=model_dir)
    assert job.proc.wait(600) == 0, job.log_tail()
    assert audit(job.run_dir)[0] == 0


def test_a_cluster_too_small_fails_fast_naming_the_shortfall(tmp_path, model_dir):
    """A private Ray of 1 CPU for a job that reserves 2: the launcher stops within a minute,
    naming each actor's reservation and what the cluster has, before any actor starts."""
    cmd = [sys.executable, "-m", "async_pmd.launch", str(REPO / "configs" / "cluster.yaml"),
           f"trainer.output_dir={tmp_path}", "trainer.experiment_name=small", f"model.path={model_dir}",
           "metrics.enabled=false", "ray.num_cpus=1"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and time.monotonic() - start < 60
    err = proc.stderr
    assert "cannot hold the job" in err and "Generator replica 0: 1 CPU" in err and "LearnerRank 0: 1 CPU" in err
    assert "node 0: 1 CPU" in err
    assert not (tmp_path / "small" / "metrics.jsonl").exists()


LEARNING = ("reward/mean", "reward/std", "actor/entropy", "actor/loss", "actor/pmd_kl", "response_length/mean",
            "adv/abs_mean", "actor/grad_norm")


def _sync_run(tmp_path: Path, model_dir: Path, name: str, seed: int) -> list[dict]:
    job = BackgroundJob(tmp_path, name, "trainer.total_steps=25", "buffer.max_staleness=0", "trainer.total_minutes=null",
                        "metrics.enabled=false", f"trainer.seed={seed}", f"data.seed={seed}", model_dir=model_dir)
    assert job.proc.wait(600) == 0, job.log_tail()
    return [{k: r[k] for k in LEARNING} for r in job.records() if "timing/step_s" in r]


def test_same_seed_same_run_in_sync_mode(tmp_path, model_dir):
    """Two synchronous runs with the same seed write the same learning columns, bit for bit; a
    different seed gives different ones (each request's sampling seed derives from
    trainer.seed, its uids and its attempt)."""
    first = _sync_run(tmp_path, model_dir, "seed0_a", 0)
    second = _sync_run(tmp_path, model_dir, "seed0_b", 0)
    other = _sync_run(tmp_path, model_dir, "seed1", 1)
    assert len(first) == 25 and first == second
    assert other != first
