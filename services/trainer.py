"""The job: start Ray, deploy the services, run the learner loop, checkpoint, export.

`setup()` builds the actors in dependency order (weights → buffer → learners → generators and
scorers → driver); `train()` is the learner loop; `cleanup()` stops everything. The loop is the
whole asynchrony story: the RolloutDriver keeps generating in the background, bounded by the
buffer's capacity and `buffer.max_staleness`, while the loop only takes batches, trains, and
publishes weights:

    take batch(step) → train on all ranks → publish weights(step + 1) → log, checkpoint
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import ray
from ray import serve
from tqdm import tqdm

from async_pmd import checkpoint, telemetry, validation, wire
from async_pmd.config import ClusterConfig, dump_config
from async_pmd.models import ensure_tiny_model, load_tokenizer
from services import loopback
from services.buffer import BUFFER_NAME, GroupBuffer
from services.driver import DRIVER_NAME, RolloutDriver, prompt_source
from services.generator import APP_NAME as GENERATOR_APP
from services.generator import Generator
from services.learner import LearnerDied, LearnerGroup
from services.scorer import APP_NAME as SCORER_APP
from services.scorer import RewardScorer
from services.weights import STORE_NAME, WeightStore

logger = logging.getLogger(__name__)

_TAKE_WAIT_S = 2.0  # the loop wakes this often while the buffer fills, to notice stops and deaths
_DRAIN_S = 30.0  # at the end, how long in-flight requests may settle before the final checkpoint
_NAME_FREE_S = 30.0  # how long a killed named actor may take to release its name
# Counters of faults the run survived; a step whose record raises one of them logs a warning line.
_FAULT_KEYS = ("driver/retries", "driver/failures/", "scorer/failures/", "buffer/refused", "learner/restarts",
               "learner/refused_batches", "groups/failed")


class Trainer:
    """Owns the job's actors and its run directory (metrics.jsonl, config.yaml, checkpoints)."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.run_dir = cfg.trainer.run_dir
        self.step = 0
        self.last_metrics: dict = {}
        self._started = time.monotonic()
        self._elapsed_before = 0.0  # wall time of earlier runs this one resumes
        self._last_checkpoint: Path | None = None  # what a learner restart rolls back to
        self._learner_restarts = 0
        self._faults_seen: dict = {}  # fault counters of the previous record, for the log line
        self._last_val: dict = {}  # the latest validation's metrics, shown in the progress line
        self._val_prompts: list | None = None  # the val split, built once (see `_val_split`)
        self._val_gauges = telemetry.RoleMetrics("val")  # Prometheus: async_pmd_val_*

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.model.build_tiny:
            ensure_tiny_model(cfg.model.path, **cfg.model.tiny.model_dump())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.run_dir / "config.yaml")
        resume_from = checkpoint.resolve_resume(cfg.trainer.resume, self.run_dir)
        self._init_ray()
        # `python -m async_pmd.scale --run-dir <run_dir>` joins this job's Ray through this file.
        (self.run_dir / "ray_address").write_text(ray.get_runtime_context().gcs_address)
        self._start_services(resume_from)

    def _start_services(self, resume_from: Path | None) -> None:
        """The actors that hold run state, restored from `resume_from` when given, in dependency order."""
        cfg = self.cfg
        ns = cfg.ray.namespace
        self.store = WeightStore.options(name=STORE_NAME, namespace=ns).remote()
        self.buffer = GroupBuffer.options(name=BUFFER_NAME, namespace=ns).remote(
            algorithm=cfg.algorithm.model_dump(), buffer=cfg.buffer.model_dump(), group_size=cfg.generator.n,
            on_failure=cfg.scorer.on_failure, pad_token_id=load_tokenizer(cfg.model.path).pad_token_id,
            max_wire_bytes=cfg.trainer.max_wire_bytes)
        self.learners = LearnerGroup(cfg, cfg.trainer.total_steps)
        state = self._restore(resume_from) if resume_from else None
        self._publish(self.step)
        self._deploy_serve()
        self.driver = RolloutDriver.options(name=DRIVER_NAME, namespace=ns).remote(
            cfg.model_dump(mode="json"))
        if state is not None:
            ray.get(self.driver.load_state_dict.remote(state["driver"]))
        self._driver_run = self.driver.run.remote()
        if cfg.trainer.test_freq or cfg.trainer.val_before_train:
            self._val_split()  # built now, so bad val data fails before the first step

    def _init_ray(self) -> None:
        cfg = self.cfg
        # Ray binds GCS, raylet and the metrics port to 127.0.0.1 only with this set (FIELD-NOTES).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        kwargs = dict(namespace=cfg.ray.namespace, include_dashboard=False, log_to_driver=True,
                      runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                                                # idle OpenMP threads must not spin on shared cores
                                                "OMP_WAIT_POLICY": "PASSIVE"}})
        if cfg.ray.address:
            ray.init(address=cfg.ray.address, **kwargs)
        else:
            if cfg.metrics.enabled:
                kwargs["_metrics_export_port"] = cfg.metrics.export_port
                kwargs["_system_config"] = {"metrics_report_interval_ms": 1000}
            kwargs["runtime_env"]["worker_process_setup_hook"] = loopback.SETUP_HOOK
            ray.init(address="local", num_cpus=self._local_cpus(), _temp_dir=cfg.ray.temp_dir, **kwargs)
            if ray.util.get_node_ip_address() != "127.0.0.1":
                logger.warning("the private Ray listens on %s, not only 127.0.0.1: Ray was imported before "
                               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set (async_pmd.launch sets it)",
                               ray.util.get_node_ip_address())

    def _local_cpus(self) -> int:
        """Logical CPUs for a private Ray: the machine's, or what the reservations need if more."""
        cfg = self.cfg
        gen = cfg.generator.autoscaling.max_replicas if cfg.generator.autoscaling else cfg.generator.num_replicas
        need = gen * cfg.generator.num_cpus + cfg.learner.num_ranks * cfg.learner.num_cpus_per_rank \
            + cfg.scorer.num_replicas * cfg.scorer.num_cpus
        return cfg.ray.num_cpus or max(os.cpu_count() or 1, int(need + 0.999))

    def _deploy_serve(self) -> None:
        cfg, gen = self.cfg, self.cfg.generator
        # Per-request access logs would flood the console at hundreds of requests a second.
        quiet = {"log_level": "WARNING", "enable_access_log": False}
        serve.start(proxy_location="Disabled", logging_config=quiet)
        scaling = ({"num_replicas": "auto", "autoscaling_config": gen.autoscaling.model_dump()}
                   if gen.autoscaling else {"num_replicas": gen.num_replicas})
        generator = Generator.options(
            ray_actor_options={"num_cpus": gen.num_cpus, "num_gpus": gen.num_gpus},
            max_ongoing_requests=gen.max_ongoing_requests,
            graceful_shutdown_timeout_s=gen.graceful_shutdown_timeout_s,
            health_check_period_s=gen.health_check_period_s, logging_config=quiet, **scaling,
        ).bind(generator=gen.model_dump(), model_path=cfg.model.path, dtype=cfg.model.dtype,
               max_prompt_length=cfg.data.max_prompt_length, namespace=cfg.ray.namespace,
               max_weight_bytes=cfg.weight_sync.max_bytes, max_wire_bytes=cfg.trainer.max_wire_bytes)
        scorer = RewardScorer.options(
            num_replicas=cfg.scorer.num_replicas, ray_actor_options={"num_cpus": cfg.scorer.num_cpus},
            max_ongoing_requests=cfg.scorer.max_ongoing_requests, logging_config=quiet,
        ).bind(scorer=cfg.scorer.model_dump(), response_length=gen.response_length,
               max_wire_bytes=cfg.trainer.max_wire_bytes)
        # The external scaler lets `python -m async_pmd.scale` change replica counts in place.
        serve.run(generator, name=GENERATOR_APP, route_prefix=None, external_scaler_enabled=not gen.autoscaling)
        serve.run(scorer, name=SCORER_APP, route_prefix=None, external_scaler_enabled=True)

    def _restore(self, path: Path) -> dict:
        state = checkpoint.read_state(path)
        self.learners.load(str(path / "learner"))
        ray.get(self.buffer.load_state_dict.remote(state["driver"]["buffer"]))
        self.step = int(state["step"])
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        self._last_checkpoint = path
        logger.info("resumed from %s at step %d", path, self.step)
        return state

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg = self.cfg.trainer
        deadline = time.monotonic() + cfg.total_minutes * 60 if cfg.total_minutes else None
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="pmd", dynamic_ncols=True)
        try:
            if cfg.val_before_train:
                self._record_validation(self.validate(), bar)
            while self.step < cfg.total_steps and (deadline is None or time.monotonic() < deadline):
                try:
                    metrics = self._train_step()
                    if self._validation_due():
                        metrics.update(self.validate())
                    self._log(metrics, bar)
                    if cfg.save_freq and self.step % cfg.save_freq == 0:
                        self.save()
                except LearnerDied as exc:
                    self._restart_from_checkpoint(exc)
                    bar.reset(total=cfg.total_steps)
                    bar.update(self.step)
        except KeyboardInterrupt:
            logger.warning("interrupted at step %d: checkpointing before shutdown", self.step)
        finally:
            bar.close()
        self._finish()
        return self.last_metrics

    def _train_step(self) -> dict:
        start = time.perf_counter()
        payload, take_metrics = self._take()
        wait_s = time.perf_counter() - start
        train_start = time.perf_counter()
        metrics = self.learners.train_step(payload)
        metrics["timing/train_s"] = time.perf_counter() - train_start
        self.step += 1
        sync_s = 0.0
        if self.step % self.cfg.weight_sync.interval == 0:
            sync_start = time.perf_counter()
            metrics.update(self._publish(self.step))
            sync_s = time.perf_counter() - sync_start
        metrics.update(take_metrics)
        metrics.update({"timing/step_s": time.perf_counter() - start, "timing/wait_batch_s": wait_s,
                        "timing/weight_sync_s": sync_s})
        return metrics

    def _take(self) -> tuple[ray.ObjectRef, dict]:
        groups = self.cfg.data.train_batch_size
        while True:
            payload, metrics = self.buffer.take.options(num_returns=2).remote(groups, self.step, _TAKE_WAIT_S)
            metrics = ray.get(metrics)
            if metrics:
                return payload, metrics
            self._check_driver()

    def _check_driver(self) -> None:
        ready, _ = ray.wait([self._driver_run], timeout=0)
        if ready:
            ray.get(ready[0])  # raises the driver's error, if any
            raise RuntimeError("the rollout driver stopped while the learner was waiting for data")

    def _publish(self, version: int) -> dict:
        return self.learners.publish(version)

    def _log(self, metrics: dict, bar: tqdm) -> None:
        status = ray.get(self.driver.status.remote())
        metrics.update(self._accounting(status))
        metrics["learner/restarts"] = self._learner_restarts
        elapsed = self._elapsed_before + time.monotonic() - self._started
        record = {"step": self.step, "time/elapsed_s": elapsed, **metrics}
        self.last_metrics = record
        self._report_faults(record)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        samples_s = self.cfg.data.train_batch_size * self.cfg.generator.n / max(metrics["timing/step_s"], 1e-9)
        bar.update(1)
        bar.write(
            f"step {self.step:>5}  reward {record.get('reward/mean', float('nan')):.3f}  "
            f"kl {record.get('actor/pmd_kl', float('nan')):+.4f}  "
            f"staleness {record.get('staleness/mean', float('nan')):.2f}  "
            f"entropy {record.get('actor/entropy', float('nan')):.3f}  {samples_s:,.0f} samples/s"
            + (f"  val {self._last_val['val/reward/mean']:.3f}" if self._last_val else "")
        )

    @staticmethod
    def _accounting(status: dict) -> dict:
        buf = status["buffer"]
        return {
            "groups/dispatched": status["dispatched"], "groups/trained": buf["trained"],
            "groups/filtered": buf["filtered"], "groups/stale": buf["stale"],
            "groups/failed": status["failed"] + buf["failed"] + buf["malformed"],
            "groups/unfinished": status["unfinished"], "groups/duplicate": buf["duplicate"],
            "groups/reissued_requests": status["reissued"], "driver/backpressure_waits": status["backpressure_waits"],
            **_fault_counters(status),
        }

    def _report_faults(self, record: dict) -> None:
        """One warning line for a step whose record raised a fault counter (see `_FAULT_KEYS`)."""
        faults = {k: v for k, v in record.items() if k.startswith(_FAULT_KEYS)}
        rises = [f"{k} +{v - self._faults_seen.get(k, 0):g}" for k, v in sorted(faults.items())
                 if v > self._faults_seen.get(k, 0)]
        if rises:
            logger.warning("faults survived by step %d: %s", self.step, ", ".join(rises))
        self._faults_seen = faults

    # ------------------------------------------------------------------ validation

    def validate(self) -> dict:
        """Score the val split at the weights the generators serve now (verl's `_validate`).

        The requests go straight to the Generator and RewardScorer deployments, never through the
        RolloutDriver or the GroupBuffer: the data cursor, the buffer, and the learner's weights
        and optimizer are untouched, and training rollouts keep flowing meanwhile.
        """
        start = time.perf_counter()
        cfg = self.cfg
        prompts = self._val_split()
        requests = validation.build_requests(
            prompts, self._tokenizer, apply_chat_template=cfg.data.apply_chat_template,
            sampling=validation.val_sampling(cfg.generator.val_kwargs),
            prompts_per_request=cfg.generator.prompts_per_request, tag=f"val{self.step}")
        generator = serve.get_deployment_handle("Generator", app_name=GENERATOR_APP)
        scorer = serve.get_deployment_handle("RewardScorer", app_name=SCORER_APP)
        # All requests go out before any result is awaited, so every replica can work on them.
        responses = [scorer.score.remote(generator.generate.remote(wire.encode_array(r))) for r in requests]
        groups = [g for response in responses for g in wire.decode(
            response.result(timeout_s=cfg.generator.request_timeout_s),
            max_bytes=cfg.trainer.max_wire_bytes, expect=wire.ScoredBatch).groups]
        metrics = validation.summarize(groups)
        for gauge, key in validation.GAUGES.items():
            self._val_gauges.set(gauge, metrics[key])
        metrics["timing/val_s"] = time.perf_counter() - start
        self._last_val = metrics
        return metrics

    def _val_split(self) -> list:
        """The held-out prompts (data.val_files or the synthetic task's val split), in one fixed order."""
        if self._val_prompts is None:
            self._tokenizer = load_tokenizer(self.cfg.model.path)
            source = prompt_source(self.cfg, self._tokenizer, split="val")
            self._val_prompts = source.next_batch(len(source))
        return self._val_prompts

    def _validation_due(self) -> bool:
        freq = self.cfg.trainer.test_freq
        return bool(freq) and (self.step % freq == 0 or self.step == self.cfg.trainer.total_steps)

    def _record_validation(self, metrics: dict, bar: tqdm) -> None:
        """A validation outside a learner step (before training) gets a record of its own."""
        elapsed = self._elapsed_before + time.monotonic() - self._started
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "time/elapsed_s": elapsed, **metrics}) + "\n")
        bar.write(f"validation at step {self.step}: reward {metrics['val/reward/mean']:.3f}  "
                  f"pass@n {metrics['val/pass@n']:.3f}  mean@n {metrics['val/mean@n']:.3f}")

    # ------------------------------------------------------------------ end of run

    def save(self) -> Path:
        """A complete checkpoint of this step (learner state, data cursor, pending prompts, accounting)."""
        tmp = checkpoint.begin(self.run_dir, self.step)
        self.learners.save(str(tmp / "learner"), {"step": self.step})
        driver_state = ray.get(self.driver.state_dict.remote())
        state = {"step": self.step, "elapsed_s": self._elapsed_before + time.monotonic() - self._started,
                 "driver": driver_state}
        self._last_checkpoint = checkpoint.commit(tmp, state, self.cfg.checkpoint.max_to_keep)
        return self._last_checkpoint

    # ------------------------------------------------------------------ learner failure

    def _restart_from_checkpoint(self, exc: LearnerDied) -> None:
        """A learner rank died: roll the whole job back to the last checkpoint, in place.

        The weights and optimizer lived only in the ranks, so the learner restarts from the last
        checkpoint. Rolling back only the learner would leave the buffer's counts, the driver's
        ledger and the data cursor ahead of it (groups counted as trained whose updates are lost)
        and the generators serving weights the new learner never reaches. So every actor holding
        run state is rebuilt from that checkpoint, exactly as `trainer.resume=auto` resumes a run:
        step, cursor and accounting continue from the checkpoint, and the work done since it is
        done again. Without a checkpoint yet, the run starts over.
        """
        self._learner_restarts += 1
        limit = self.cfg.trainer.max_learner_restarts
        if self._learner_restarts > limit:
            raise RuntimeError(f"learner failed {self._learner_restarts} times "
                               f"(trainer.max_learner_restarts={limit})") from exc
        logger.error("learner failure at step %d (%s): restart %d of %d from %s", self.step, exc,
                     self._learner_restarts, limit, self._last_checkpoint or "the start")
        failed_at = time.monotonic()
        elapsed = self._elapsed_before + failed_at - self._started
        self._stop_services()
        self.step = 0
        self._start_services(self._last_checkpoint)
        self._elapsed_before, self._started = elapsed, failed_at  # wall time never rolls back
        logger.warning("learner restarted: continuing from step %d", self.step)

    def _stop_services(self) -> None:
        """Kill the actors `_start_services` made; the driver first, so nothing more reaches the buffer."""
        ray.kill(self.driver)
        self.learners.shutdown()
        ray.kill(self.buffer)
        ray.kill(self.store)
        for name in (DRIVER_NAME, BUFFER_NAME, STORE_NAME):
            _wait_until_unnamed(name, self.cfg.ray.namespace)

    def _finish(self) -> None:
        ray.get(self.driver.pause.remote())
        deadline = time.monotonic() + _DRAIN_S
        while time.monotonic() < deadline and ray.get(self.driver.status.remote())["inflight_requests"]:
            time.sleep(0.1)
        self.save()
        status = ray.get(self.driver.status.remote())
        self.last_metrics.update(self._accounting(status))
        generator = serve.get_deployment_handle("Generator", app_name=GENERATOR_APP)
        summary = {**self._accounting(status), "learner/restarts": self._learner_restarts,
                   "generator": generator.stats.remote().result()}
        (self.run_dir / "accounting.json").write_text(json.dumps(summary, indent=1))
        if self.cfg.checkpoint.export_hf:
            self.learners.export_hf(str(self.run_dir / "final_hf"))

    def cleanup(self) -> None:
        try:
            if getattr(self, "driver", None) is not None:
                ray.get(self.driver.stop.remote())
            serve.shutdown()
            if getattr(self, "learners", None) is not None:
                self.learners.shutdown()  # also removes the ranks' rendezvous file
        finally:
            (self.run_dir / "ray_address").unlink(missing_ok=True)  # no job to scale any more
            ray.shutdown()


def _fault_counters(status: dict) -> dict:
    """Faults survived, from the driver's status: re-issues and their causes (exception type),
    failed reward calls by reason (all scorer replicas), and wire messages the buffer refused.
    The driver's counters start at 0 with each driver process; the buffer's are checkpointed."""
    buf = status["buffer"]
    counters = {"driver/retries": status["retries"], "driver/deterministic_failures": status["deterministic_failures"],
                "driver/max_attempt": status.get("max_attempt", 0), "buffer/refused": buf["refused"]}
    counters.update({f"driver/{k}": v for k, v in status.items() if k.startswith("failures/")})
    counters.update({f"scorer/failures/{reason}": n for reason, n in buf.get("reward_failures", {}).items()})
    return counters


def _wait_until_unnamed(name: str, namespace: str) -> None:
    """Block until a killed named actor has released its name, so a new one can take it."""
    deadline = time.monotonic() + _NAME_FREE_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.1)
    raise RuntimeError(f"actor {name!r} still holds its name {_NAME_FREE_S:g}s after it was killed")
