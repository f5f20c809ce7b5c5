"""Partial rollouts end to end, through the real CLI on `configs/longtail.yaml` (Ray, Serve, the torch
engine, DeepSpeed): responses of up to 48 tokens generated 16 (or fewer) at a time and continued
in later requests. The run learns with exact accounting; a SIGKILL after a checkpoint that holds
partial responses, then `trainer.resume=auto`, continues exactly those responses (counted in the
checkpoint before and in the resumed driver after) and the audit finds every prompt's fate once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from async_pmd import checkpoint
from async_pmd.ports import find_free_port
from background_job import REPO, BackgroundJob

pytestmark = pytest.mark.slow

LEARN = ("actor.lr=1e-3", "data.train_batch_size=16", "generator.prompts_per_request=8",
         "metrics.enabled=false", "trainer.total_minutes=null")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model") / "tiny"


def job(tmp_path, name, *overrides, model_dir, **kw) -> BackgroundJob:
    return BackgroundJob(tmp_path, name, *LEARN, *overrides, model_dir=model_dir, config="longtail.yaml", **kw)


def steps_of(records):
    return [r for r in records if "timing/step_s" in r]


def assert_accounting(r: dict) -> None:
    settled = sum(r[f"groups/{k}"] for k in ("trained", "filtered", "stale", "failed", "unfinished"))
    assert r["groups/dispatched"] == settled, r


def partial_metrics(port: int) -> dict[str, float]:
    """The driver's `partial` series on Ray's metrics export port (Ray prefixes `ray_`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ray_async_pmd_driver_partial_"):
            series, _, value = line.rpartition(" ")
            name = series.split("{")[0].removeprefix("ray_")
            found[name] = found.get(name, 0.0) + float(value)
    return found


def test_longtail_learns_with_partial_rollouts_and_exact_accounting(tmp_path, model_dir):
    """8-token segments (up to 6 per response): the reward climbs well above its start, responses
    really span several segments and versions, every record's accounting is exact, each step
    trains one batch, and staleness (the oldest segment's) stays within buffer.max_staleness.
    The driver's partial counters reach Prometheus (Ray's metrics port) while it runs."""
    steps, port = 300, find_free_port()
    run = job(tmp_path, "learn", f"trainer.total_steps={steps}", "generator.partial_rollout.segment_tokens=8",
              "metrics.enabled=true", f"metrics.export_port={port}", model_dir=model_dir)
    # Counters appear once they first move; restarts need a segment older than the cap, rare here.
    expected = {f"async_pmd_driver_partial_{k}" for k in (
        "segments_total", "continued_segments_total", "completed_groups_total", "open_groups", "queued_rows")}
    exported: dict[str, float] = {}
    while run.proc.poll() is None and not (expected <= set(exported)
                                           and exported["async_pmd_driver_partial_continued_segments_total"] > 0):
        time.sleep(1.0)
        try:
            exported = partial_metrics(port)
        except OSError:  # Ray's agent not up yet
            pass
    assert run.proc.wait(900) == 0, run.log_tail()
    records = steps_of(run.records())
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    first = sum(r["reward/mean"] for r in records[:20]) / 20
    last = sum(r["reward/mean"] for r in records[-20:]) / 20
    assert last > max(3 * first, 0.1), (first, last)
    for r in records:
        assert_accounting(r)
        assert r["groups/trained"] == r["step"] * 16
        assert r["staleness/max"] <= 1
    assert max(r["partial/segments_per_response"] for r in records) > 2
    assert records[-1]["partial/continued_segments"] > 0
    assert any(r["partial/old_version_token_share"] > 0 for r in records)
    final = json.loads((run.run_dir / "accounting.json").read_text())
    assert_accounting(final)
    assert expected <= set(exported) <= expected | {"async_pmd_driver_partial_restarts_total"}, exported
    assert 0 < exported["async_pmd_driver_partial_continued_segments_total"] <= records[-1]["partial/continued_segments"]
    assert exported["async_pmd_driver_partial_continued_segments_total"] \
        < exported["async_pmd_driver_partial_segments_total"] <= records[-1]["partial/segments"]


def _partial_in(checkpoint: Path) -> tuple[int, int, int]:
    """(open groups, those with a response begun, their saved tokens) that a resume continues."""
    driver = json.loads((checkpoint / "trainer_state.json").read_text())["driver"]
    pending = {p["uid"] for p in driver["ledger"]["pending"]}
    groups = [g for g in driver["partial"]["groups"] if g["uid"] in pending]
    started = [g for g in groups if any(r["tokens"] for r in g["responses"])]
    return len(groups), len(started), sum(len(r["tokens"]) for g in groups for r in g["responses"])


def _wait_for_a_checkpoint_with_begun_responses(run: BackgroundJob, timeout_s: float = 600) -> None:
    """Until the newest checkpoint holds an open group with a response begun. Whether one does is
    timing: a save that lands while every open group's first segment is in flight holds none (seen
    in CI at step 10), so each save is looked at, not only one picked by step count."""
    deadline, seen = time.monotonic() + timeout_s, set()
    while True:
        assert run.proc.poll() is None, f"the job exited ({run.proc.returncode}), saves seen: {sorted(seen)}"
        assert time.monotonic() < deadline, f"no save with a begun response in {timeout_s} s: {sorted(seen)}"
        last = checkpoint.latest(run.run_dir)
        if last is not None and last.name not in seen:
            seen.add(last.name)
            try:
                if _partial_in(last)[1] > 0:
                    return
            except FileNotFoundError:  # pruned (checkpoint.max_to_keep) between the look and the read
                pass
        time.sleep(0.2)


def test_sigkill_then_resume_continues_the_saved_partial_responses(tmp_path, model_dir):
    """SIGKILL the launcher's process group once a checkpoint holds open groups with tokens; the
    resumed run restores exactly those groups and tokens (not sampled again from the prompt),
    continues them, and ends with every prompt's fate recorded once (the audit)."""
    common = ("trainer.total_steps=40", "trainer.save_freq=5", "trainer.resume=auto",
              "generator.partial_rollout.segment_tokens=4")
    first = job(tmp_path, "killed", *common, model_dir=model_dir, new_session=True)
    _wait_for_a_checkpoint_with_begun_responses(first)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(30)
    last = checkpoint.latest(first.run_dir)  # the one a resume reads: a save may have come since the look
    groups, started, tokens = _partial_in(last)
    assert groups > 0 and started > 0 and tokens > 0, (last.name, groups, started, tokens)

    second = job(tmp_path, "killed", *common, model_dir=model_dir, new_session=True)
    assert second.proc.wait(900) == 0, second.log_tail()
    records = steps_of(second.records())
    resumed = [r for r in records if r["step"] > int(last.name.removeprefix("step_"))]
    assert resumed[0]["partial/resumed_groups"] == groups
    assert resumed[0]["partial/resumed_tokens"] == tokens
    assert resumed[-1]["partial/continued_segments"] > 0
    assert [r["step"] for r in records] == list(range(1, 41))
    for r in resumed:
        assert_accounting(r)
    audit = subprocess.run([sys.executable, "-m", "async_pmd.audit", str(second.run_dir)], check=False, cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "trained 640" in audit.stdout, audit.stdout
