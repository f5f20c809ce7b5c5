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

from async_pmd import checkpoint
from async_pmd.config import ClusterConfig, dump_config
from async_pmd.models import ensure_tiny_model, load_tokenizer
from services.buffer import BUFFER_NAME, GroupBuffer
from services.driver import DRIVER_NAME, RolloutDriver
from services.generator import APP_NAME as GENERATOR_APP
from services.generator import Generator
from services.learner import LearnerGroup
from services.scorer import APP_NAME as SCORER_APP
from services.scorer import RewardScorer
from services.weights import STORE_NAME, WeightStore

logger = logging.getLogger(__name__)

_TAKE_WAIT_S = 2.0  # the loop wakes this often while the buffer fills, to notice stops and deaths
_DRAIN_S = 30.0  # at the end, how long in-flight requests may settle before the final checkpoint


class Trainer:
    """Owns the job's actors and its run directory (metrics.jsonl, config.yaml, checkpoints)."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.run_dir = cfg.trainer.run_dir
        self.step = 0
        self.last_metrics: dict = {}
        self._started = time.monotonic()
        self._elapsed_before = 0.0  # wall time of earlier runs this one resumes

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.model.build_tiny:
            ensure_tiny_model(cfg.model.path, **cfg.model.tiny.model_dump())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.run_dir / "config.yaml")
        resume_from = checkpoint.resolve_resume(cfg.trainer.resume, self.run_dir)
        self._init_ray()
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
            ray.init(address="local", num_cpus=self._local_cpus(), _temp_dir=cfg.ray.temp_dir, **kwargs)

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
            graceful_shutdown_timeout_s=gen.graceful_shutdown_timeout_s, logging_config=quiet, **scaling,
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
        logger.info("resumed from %s at step %d", path, self.step)
        return state

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg = self.cfg.trainer
        deadline = time.monotonic() + cfg.total_minutes * 60 if cfg.total_minutes else None
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="pmd", dynamic_ncols=True)
        try:
            while self.step < cfg.total_steps and (deadline is None or time.monotonic() < deadline):
                metrics = self._train_step()
                self._log(metrics, bar)
                if cfg.save_freq and self.step % cfg.save_freq == 0:
                    self.save()
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
        elapsed = self._elapsed_before + time.monotonic() - self._started
        record = {"step": self.step, "time/elapsed_s": elapsed, **metrics}
        self.last_metrics = record
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        samples_s = self.cfg.data.train_batch_size * self.cfg.generator.n / max(metrics["timing/step_s"], 1e-9)
        bar.update(1)
        bar.write(
            f"step {self.step:>5}  reward {record.get('reward/mean', float('nan')):.3f}  "
            f"kl {record.get('actor/pmd_kl', float('nan')):+.4f}  "
            f"staleness {record.get('staleness/mean', float('nan')):.2f}  "
            f"entropy {record.get('actor/entropy', float('nan')):.3f}  {samples_s:,.0f} samples/s"
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
        }

    # ------------------------------------------------------------------ end of run

    def save(self) -> Path:
        """A complete checkpoint of this step (learner state, data cursor, pending prompts, accounting)."""
        tmp = checkpoint.begin(self.run_dir, self.step)
        self.learners.save(str(tmp / "learner"), {"step": self.step})
        driver_state = ray.get(self.driver.state_dict.remote())
        state = {"step": self.step, "elapsed_s": self._elapsed_before + time.monotonic() - self._started,
                 "driver": driver_state}
        return checkpoint.commit(tmp, state, self.cfg.checkpoint.max_to_keep)

    def _finish(self) -> None:
        ray.get(self.driver.pause.remote())
        deadline = time.monotonic() + _DRAIN_S
        while time.monotonic() < deadline and ray.get(self.driver.status.remote())["inflight_requests"]:
            time.sleep(0.1)
        self.save()
        status = ray.get(self.driver.status.remote())
        self.last_metrics.update(self._accounting(status))
        generator = serve.get_deployment_handle("Generator", app_name=GENERATOR_APP)
        summary = {**self._accounting(status), "generator": generator.stats.remote().result()}
        (self.run_dir / "accounting.json").write_text(json.dumps(summary, indent=1))
        if self.cfg.checkpoint.export_hf:
            self.learners.export_hf(str(self.run_dir / "final_hf"))

    def cleanup(self) -> None:
        try:
            if getattr(self, "driver", None) is not None:
                ray.get(self.driver.stop.remote())
            serve.shutdown()
        finally:
            ray.shutdown()
