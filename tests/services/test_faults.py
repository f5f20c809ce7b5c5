"""Faults injected for real into the running job: what it survives, and that nothing is lost.

Each fixture runs the whole job (`job.loop.Trainer`, which starts its own private Ray,
Serve, a torch generator, a scorer, the GroupBuffer and a DeepSpeed learner) in this process, with
an injector thread doing the damage from outside, then the tests read what the run wrote:

- generator_run: the generator replica's process is SIGKILLed three times (its pid asked of the
  service itself), the reward function raises / hangs / returns NaN / returns a string under
  `buffer.on_reward_failure=drop_group`, hostile wire messages are put straight into the live buffer,
  and the job's listening sockets are listed.
- learner_run: the learner rank's process is SIGKILLed after a checkpoint; the trainer rebuilds
  the job from that checkpoint. The same faulty rewards run under `on_reward_failure=zero`, hostile
  TrainBatch bytes are sent straight to the new learner rank, and the learner is made ~16x slower
  than generation (ppo_epochs x mini-batches) with `buffer.max_staleness` 2, which would admit
  three batches ahead: the buffer's capacity (1.5 batches) is what bounds memory, and a sampler
  thread records the peaks through the whole run, restart included.

The accounting `groups/dispatched == trained + filtered + stale + failed + unfinished` is checked
on every record: a group lost, counted twice, or smuggled in by a bad message would break it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import ray

from async_pmd import names, wire
from async_pmd.checkpoint import STATE_FILE, checkpoint_root, latest
from async_pmd.config import load_config
from async_pmd.ports import find_free_port
from bad_wire import hostile, scored_batch, train_batch
from job.deploy import generator_handle
from job.loop import Trainer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FAULTY_REWARD = f"{REPO / 'tests' / 'data' / 'faulty_reward.py'}:reward"
BATCH = 32  # data.train_batch_size of configs/cluster.yaml
MAX_WIRE_BYTES = 2**20
WAIT_S = 300.0  # an injector gives up on a step that never comes (the test then fails)
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


@dataclass
class Job:
    """What one run left behind, and what its injector saw."""

    run_dir: Path
    records: list[dict]
    accounting: dict
    log: list[str]
    seen: dict = field(default_factory=dict)

    @property
    def final(self) -> dict:
        return self.records[-1]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_job(out: Path, model_dir: Path, name: str, overrides: list[str], *injectors) -> Job:
    """Run the job in this process, each `inject(trainer, seen, done)` in a thread beside it."""
    cfg = load_config(REPO / "configs" / "cluster.yaml", [
        f"trainer.output_dir={out}", f"trainer.experiment_name={name}", f"model.path={model_dir}",
        "trainer.total_minutes=null", f"wire.max_bytes={MAX_WIRE_BYTES}", *overrides])
    trainer, seen, done, errors = Trainer(cfg), {}, threading.Event(), []
    handler = _Lines()
    logging.getLogger("job").addHandler(handler)

    def guarded(inject):
        try:
            inject(trainer, seen, done)
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(inject,), daemon=True) for inject in injectors]
    try:
        trainer.setup()
        for thread in threads:
            thread.start()
        trainer.train()
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=60)
        trainer.cleanup()
        logging.getLogger("services").removeHandler(handler)
    assert not errors, errors
    run_dir = out / name
    (run_dir / "injected.json").write_text(json.dumps(seen, indent=1, default=str))  # for the README's figures
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return Job(run_dir, records, json.loads((run_dir / "accounting.json").read_text()), handler.lines, seen)


def wait_for(condition, done: threading.Event) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if done.is_set() or time.monotonic() > deadline:
            raise TimeoutError("the run never reached the injector's condition")
        time.sleep(0.05)


def listening_sockets() -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of this process and its
    descendants: the in-process job's Ray (GCS, raylet, agents, workers, Serve replicas)."""
    me = psutil.Process()
    found = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            found += [(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass  # a worker that exited meanwhile
    return found


def driver_connections_to_serve_grpc() -> list[int]:
    """The RolloutDriver process's open TCP connections to a generator replica's Serve gRPC server
    (the port the controller lists for the replica, not its Ray core worker's): their ports."""
    from ray.serve.context import _get_global_client

    running = ray.get(_get_global_client()._controller._all_running_replicas.remote())
    ports = {r.port for d, infos in running.items() if d.app_name == names.GENERATOR_APP for r in infos}
    me = psutil.Process()
    drivers = [p for p in me.children(recursive=True) if "RolloutDriver" in " ".join(p.cmdline())]
    assert len(drivers) == 1, drivers
    return [c.raddr.port for c in drivers[0].net_connections("inet")
            if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port in ports]


def assert_accounting(record: dict) -> None:
    settled = sum(record[f"groups/{k}"] for k in ("trained", "filtered", "stale", "failed", "unfinished"))
    assert record["groups/dispatched"] == settled, record


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model") / "tiny"


# ---------------------------------------------------------------- generator replicas killed

GENERATOR_STEPS = 40
EFFECTIVE_KILLS = 3  # kills that caught a request on the replica
MAX_KILLS = 6


def _retries(trainer: Trainer) -> int:
    return ray.get(trainer.services.driver.status.remote()).retries


def _kill_busy_generator(trainer: Trainer, generator, done: threading.Event) -> dict:
    """SIGKILL the replica (its pid asked of the service) while its engine is generating."""
    for _ in range(500):
        status = generator.status.remote().result(timeout_s=WAIT_S)
        if status["busy"]:
            break
        time.sleep(0.01)
    retries_before, step = _retries(trainer), trainer.step
    os.kill(status["pid"], signal.SIGKILL)
    wait_for(lambda: trainer.step >= step + 2, done)  # a replacement replica is serving
    return {"step": step, "pid": status["pid"], "busy": status["busy"],
            "reissued": _retries(trainer) - retries_before}


def _kill_generators_and_send_bad_wire(trainer: Trainer, seen: dict, done: threading.Event) -> None:
    """Once the job runs: list its listening sockets and put hostile bytes into the live buffer;
    then kill the generator replica until EFFECTIVE_KILLS kills caught work in flight (a kill
    between two requests has nothing to re-issue)."""
    wait_for(lambda: trainer.step >= 2, done)
    seen["listeners"] = listening_sockets()
    seen["driver_to_replica_grpc"] = driver_connections_to_serve_grpc()
    buffer = ray.get_actor(names.BUFFER, namespace=trainer.cfg.ray.namespace)
    valid = wire.encode(scored_batch(["bad-wire-0"], trainer.cfg.generator.n))
    oversized = wire.encode(scored_batch(["bad-wire-big"], trainer.cfg.generator.n, response_len=MAX_WIRE_BYTES // 32),
                            max_bytes=2**30)
    seen["wire"] = {name: ray.get(buffer.put.remote(message))
                    for name, message in hostile(valid, kind="ScoredBatch", oversized=oversized).items()}
    generator = generator_handle()
    seen["kills"] = []
    while sum(k["reissued"] > 0 for k in seen["kills"]) < EFFECTIVE_KILLS and len(seen["kills"]) < MAX_KILLS:
        wait_for(lambda: trainer.step >= 4 + (seen["kills"][-1]["step"] + 2 if seen["kills"] else 0), done)
        seen["kills"].append(_kill_busy_generator(trainer, generator, done))


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory, model_dir) -> Job:
    # Sockets this test process held before the job (e.g. the TCPStore an in-process DeepSpeed
    # unit test left open earlier in the session) are not the job's.
    before = set(listening_sockets())
    job = run_job(tmp_path_factory.mktemp("faults"), model_dir, "generator_kills", [
        f"trainer.total_steps={GENERATOR_STEPS}", "trainer.save_freq=0", "metrics.enabled=true",
        f"metrics.export_port={find_free_port()}", f"scorer.reward_fn={FAULTY_REWARD}", "scorer.timeout_s=0.25",
        "buffer.on_reward_failure=drop_group"], _kill_generators_and_send_bad_wire)
    job.seen["listeners"] = [s for s in job.seen["listeners"] if s not in before]
    return job


def test_run_completes_through_three_generator_deaths(generator_run):
    kills = generator_run.seen["kills"]
    assert sum(k["reissued"] > 0 for k in kills) == EFFECTIVE_KILLS, kills
    assert len({k["pid"] for k in kills}) == len(kills)  # a new replica process each time
    assert [r["step"] for r in generator_run.records] == list(range(1, GENERATOR_STEPS + 1))
    assert generator_run.accounting["generator"]["pid"] not in {k["pid"] for k in kills}


def test_requests_on_a_dead_replica_are_reissued_exactly_once(generator_run):
    """Each request that failed with its replica was re-issued once and then completed (the
    highest attempt that completed is 2; none was given up); no group was trained twice."""
    final, kills = generator_run.final, generator_run.seen["kills"]
    assert final["driver/retries"] == sum(k["reissued"] for k in kills) == final["groups/reissued_requests"]
    failures = sum(v for k, v in final.items() if k.startswith("driver/failures/"))
    assert failures == final["driver/retries"]
    assert final["driver/max_attempt"] == 2 and final["driver/deterministic_failures"] == 0
    assert all(k["reissued"] <= 4 for k in kills)  # at most driver.max_inflight_requests per death
    assert final["groups/duplicate"] == 0


def test_accounting_holds_on_every_record(generator_run):
    for record in generator_run.records:
        assert_accounting(record)
        assert record["groups/trained"] == record["step"] * BATCH  # no group trained twice
    assert_accounting(generator_run.accounting)


def test_failures_are_in_metrics_and_log(generator_run):
    final = generator_run.final
    assert final["driver/retries"] >= 3 and any(k.startswith("driver/failures/") for k in final)
    assert any("faults survived" in line and "driver/retries" in line for line in generator_run.log)


def test_scorer_faults_are_counted_by_reason_and_drop_their_groups(generator_run):
    """raise / hang past the timeout / NaN / string: each counted by reason; under drop_group the
    groups holding one are failed (not trained), every trained reward is finite."""
    final = generator_run.final
    for reason in ("exception:ValueError", "timeout", "nonfinite", "type"):
        assert final.get(f"scorer/failures/{reason}", 0) > 0, reason
    assert final["groups/failed"] > 0
    assert all(-1e9 < r["reward/mean"] < 1e9 for r in generator_run.records)
    assert any("scorer/failures/" in line for line in generator_run.log)


def test_bad_wire_into_the_live_buffer_is_refused_and_counted(generator_run):
    """Sent straight to the running buffer: every message refused, `buffer/refused` counts them,
    and the accounting (checked above) proves none of their groups got in."""
    results = generator_run.seen["wire"]
    assert {name: r.get("refused") for name, r in results.items()} == dict.fromkeys(results, 1)
    assert generator_run.final["buffer/refused"] == len(results)


def test_nothing_listens_beyond_loopback(generator_run):
    """The embedded default, metrics export port included, listens on 127.0.0.1 only."""
    listeners = generator_run.seen["listeners"]
    assert len(listeners) >= 5  # GCS, raylet, agents, workers, replicas: the listing saw the job
    assert [s for s in listeners if s[1] not in LOOPBACK] == []


def test_the_driver_sends_requests_to_the_replicas_grpc_server(generator_run):
    """The driver's generator requests go to the replica's own gRPC server (`services.driver.direct_handle`),
    not as Serve's streaming Ray actor calls: its process holds a connection to that server."""
    assert generator_run.seen["driver_to_replica_grpc"] != []


# ---------------------------------------------------------------- learner rank killed, overload

LEARNER_STEPS = 30
LEARNER_SAVE_FREQ = 10
LEARNER_KILL_AFTER = 15  # learner steps; the last checkpoint is then step 10
CAPACITY = 48  # buffer.capacity_groups: a train batch (32) plus one request (16 prompts)
LEARNER_MAX_STALENESS = 2
MAX_INFLIGHT = 4


def _kill_learner_and_send_bad_wire(trainer: Trainer, seen: dict, done: threading.Event) -> None:
    wait_for(lambda: trainer.step >= LEARNER_KILL_AFTER and latest(trainer.run_dir) is not None, done)
    seen["checkpoint"] = int(latest(trainer.run_dir).name.removeprefix("step_"))
    seen["killed_at"] = trainer.step
    os.kill(trainer.services.learners.pids()[0], signal.SIGKILL)
    # Once rebuilt and training again, send hostile TrainBatch bytes to the new rank 0.
    wait_for(lambda: trainer.last_metrics.get("learner/restarts") == 1, done)
    rank = trainer.services.learners.ranks[0]
    valid = wire.encode(train_batch())
    oversized = wire.encode(train_batch(rows=64, response_len=MAX_WIRE_BYTES // 64), max_bytes=2**30)
    seen["wire"] = {}
    for name, message in hostile(valid, kind="TrainBatch", oversized=oversized).items():
        try:
            ray.get(rank.train_step.remote(message))
            seen["wire"][name] = "accepted"
        except wire.WireError:
            seen["wire"][name] = "refused"


def _sample_caps(trainer: Trainer, seen: dict, done: threading.Event) -> None:
    """Peaks of the in-flight requests, held groups and unsettled groups, every 50 ms."""
    peaks = dict.fromkeys(("inflight_requests", "held", "unfinished"), 0)
    seen["peaks"], seen["samples"] = peaks, 0
    while not done.is_set():
        try:
            status = ray.get(trainer.services.driver.status.remote())
        except ray.exceptions.RayActorError:
            continue  # the driver being rebuilt after the learner's death
        for key, value in (("inflight_requests", status.inflight_requests),
                           ("held", status.buffer.held), ("unfinished", status.unfinished)):
            peaks[key] = max(peaks[key], value)
        seen["samples"] += 1
        time.sleep(0.05)


@pytest.fixture(scope="module")
def learner_run(tmp_path_factory, model_dir) -> Job:
    return run_job(tmp_path_factory.mktemp("faults"), model_dir, "learner_kill", [
        f"trainer.total_steps={LEARNER_STEPS}", f"trainer.save_freq={LEARNER_SAVE_FREQ}", "metrics.enabled=false",
        f"scorer.reward_fn={FAULTY_REWARD}", "scorer.timeout_s=0.25", "buffer.on_reward_failure=zero",
        "actor.ppo_epochs=4", "actor.ppo_mini_batch_size=8",  # 16 optimizer steps per learner step
        f"buffer.max_staleness={LEARNER_MAX_STALENESS}", f"buffer.capacity_groups={CAPACITY}",
        f"driver.max_inflight_requests={MAX_INFLIGHT}"], _kill_learner_and_send_bad_wire, _sample_caps)


def test_learner_death_restarts_from_the_last_checkpoint(learner_run):
    """The steps run 1..k, the rank dies, and the run continues from the checkpoint's step + 1
    to the end; metrics.jsonl keeps the surviving timeline (each step once: the records past the
    checkpoint were cut when it rolled back), and the restart is in the metrics, the
    accounting summary and the log."""
    ckpt, killed_at = learner_run.seen["checkpoint"], learner_run.seen["killed_at"]
    steps = [r["step"] for r in learner_run.records]
    assert steps == list(range(1, LEARNER_STEPS + 1)) and killed_at > ckpt
    first_after = next(r["step"] for r in learner_run.records if r["learner/restarts"] == 1)
    assert first_after == ckpt + 1
    assert learner_run.accounting["learner/restarts"] == 1
    assert any("learner failure at step" in line for line in learner_run.log)
    assert any(f"rolled back to step {ckpt}" in line for line in learner_run.log)
    # Staleness is counted from the checkpoint's weights after the rollback, and stays bounded.
    assert all(r["staleness/max"] <= LEARNER_MAX_STALENESS for r in learner_run.records)


def test_restart_keeps_the_cursor_step_and_accounting_exact(learner_run):
    """After the rollback the data cursor, the step and the counts continue from the checkpoint:
    trained == step x batch on every record, and every prompt drawn was dispatched exactly once."""
    for record in learner_run.records:
        assert_accounting(record)
        assert record["groups/trained"] == record["step"] * BATCH
    final_state = json.loads((latest(learner_run.run_dir) / STATE_FILE).read_text())
    source, ledger = final_state["driver"]["source"], final_state["driver"]["ledger"]
    assert final_state["step"] == LEARNER_STEPS
    assert source["epoch"] * source["num_prompts"] + source["position"] == ledger["dispatched"]


def test_no_checkpoint_is_left_half_written(learner_run):
    root = checkpoint_root(learner_run.run_dir)
    assert not list(root.glob("*.tmp"))
    for step_dir in root.glob("step_*"):
        assert (step_dir / STATE_FILE).is_file() and (step_dir / "learner").is_dir(), step_dir


def test_scorer_faults_under_zero_policy_score_zero_and_keep_groups(learner_run):
    final = learner_run.final
    for reason in ("exception:ValueError", "timeout", "nonfinite", "type"):
        assert final.get(f"scorer/failures/{reason}", 0) > 0, reason
    assert final["groups/failed"] == 0  # on_reward_failure=zero: a failed reward is 0, its group trains


def test_bad_wire_sent_to_the_learner_is_refused_and_counted(learner_run):
    results = learner_run.seen["wire"]
    assert results == dict.fromkeys(results, "refused")
    assert learner_run.final["learner/refused_batches"] == len(results)


def test_overload_is_bounded_by_the_caps(learner_run):
    """The driver outruns the slow learner (it had to wait: backpressure), yet held groups,
    unsettled groups and in-flight requests never exceed their caps: memory stays bounded."""
    peaks, final = learner_run.seen["peaks"], learner_run.final
    assert learner_run.seen["samples"] > 10
    assert final["driver/backpressure_waits"] > 0
    assert peaks["unfinished"] >= CAPACITY - 16  # the cap, not the learner's pace, held it back
    assert peaks["held"] <= CAPACITY and peaks["unfinished"] <= CAPACITY
    assert peaks["inflight_requests"] <= MAX_INFLIGHT


@pytest.mark.parametrize("run", ["generator_run", "learner_run"])
def test_every_prompt_has_one_fate_after_the_faults(run, request):
    """Through replica kills, reward faults, hostile wire and a learner rollback, the audit of
    the final checkpoint finds every prompt drawn trained once, stale, failed, or pending."""
    import subprocess
    import sys

    job = request.getfixturevalue(run)
    proc = subprocess.run([sys.executable, "-m", "async_pmd.audit", str(job.run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
