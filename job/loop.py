"""`Trainer`: the learner loop of one job, over the actors `job.deploy` builds.

`setup()` starts Ray and the services; `train()` is the loop; `cleanup()` stops everything. The
loop is the whole asynchrony story: the RolloutDriver keeps generating in the background, bounded
by the buffer's capacity and `buffer.max_staleness`, while the loop only takes batches, trains,
and publishes weights:

    take batch(step) → train on all ranks → publish weights(step + 1) → log, checkpoint
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path

import ray
from ray import serve
from tqdm import tqdm

from async_pmd import checkpoint
from async_pmd.config import ClusterConfig, dump_config
from async_pmd.models import ensure_tiny_model, load_tokenizer
from job import cluster, deploy, record
from job.restart import LearnerRestarts
from job.validate import Validator
from services.learner import LearnerDied

logger = logging.getLogger(__name__)

_TAKE_WAIT_S = 2.0  # the loop wakes this often while the buffer fills, to notice stops and deaths
_DRAIN_S = 30.0  # at the end, how long in-flight requests may settle before the final checkpoint


class Trainer:
    """Owns the job's actors and its run directory (metrics.jsonl, config.yaml, checkpoints)."""

    def __init__(self, cfg: ClusterConfig, launched_at: float | None = None):
        """`launched_at`: the launcher's `time.monotonic()` at its start; the first learner step
        logs how long after it came."""
        self.cfg = cfg
        self._launched_at = launched_at if launched_at is not None else time.monotonic()
        self.run_dir = cfg.trainer.run_dir
        self.step = 0
        self._published = -1  # the newest weight version this loop has published
        self.last_metrics: dict = {}
        self.services: deploy.Services | None = None
        self._started = time.monotonic()
        self._elapsed_before = 0.0  # wall time of earlier runs this one resumes
        self._last_checkpoint: Path | None = None  # what a learner restart rolls back to
        self._restarts = LearnerRestarts(cfg.trainer.max_learner_restarts)
        self._log = record.RunLog(self.run_dir, cfg.data.train_batch_size * cfg.generator.n, tuple(cfg.trainer.logger),
                                  cfg.trainer.project_name, cfg.trainer.experiment_name, cfg.model_dump(mode="json"))
        self._faults = record.FaultReport()
        self._validator: Validator | None = None
        self._last_val: dict = {}  # the latest validation's metrics, shown in the progress line

    # ------------------------------------------------------------------ setup

    def setup(self, ray_started: bool = False) -> None:
        """Ray (unless `ray_started`: the launcher starts it beside its own imports), then the
        services; a cluster too small for the job fails here, before any actor starts."""
        cfg = self.cfg
        if cfg.model.build_tiny:
            ensure_tiny_model(cfg.model.path, **cfg.model.tiny.model_dump())
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, self.run_dir / "config.yaml")
        resume_from = checkpoint.resolve_resume(cfg.trainer.resume, self.run_dir)
        tokenizer = load_tokenizer(cfg.model.path)
        self._pad_token_id = tokenizer.pad_token_id
        if cfg.trainer.test_freq or cfg.trainer.val_before_train:
            self._validator = Validator(cfg, tokenizer)
        if not ray_started:
            cluster.init_ray(cfg)
        cluster.check_resources(cfg)  # before any actor: a cluster too small fails now, naming the shortfall
        # `python -m async_pmd.scale --run-dir <run_dir>` joins this job's Ray through this file.
        (self.run_dir / "ray_address").write_text(ray.get_runtime_context().gcs_address)
        self._start_services(resume_from)

    def _start_services(self, resume_from: Path | None) -> None:
        self.services, restored = deploy.start_services(self.cfg, self._pad_token_id, resume_from)
        self.step, self._last_checkpoint = restored.step, resume_from
        self._published = restored.step  # start_services publishes the weights it starts from
        if resume_from is not None:
            self._elapsed_before = restored.elapsed_s
        # The records past the step this run starts from (a checkpoint's, or 0) are not on its timeline.
        self._log.roll_back(self.step)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """The loop, until `trainer.total_steps`, `trainer.total_minutes`, or a stop signal.

        Ctrl-C or SIGTERM asks for a stop: the step in flight (if a batch was taken) is trained
        and recorded, then the job drains and checkpoints; a second signal only says so again.
        So a stop never counts an untrained batch as trained, nor checkpoints a half-applied step.
        """
        cfg = self.cfg.trainer
        self._deadline = time.monotonic() + cfg.total_minutes * 60 if cfg.total_minutes else None
        total = self.total_steps()
        bar = tqdm(total=total, initial=self.step, desc="pmd", dynamic_ncols=True)
        with _StopOnSignal() as stop:
            self._stop = stop
            try:
                if cfg.val_before_train:
                    self._record_validation(self.validate(), bar)
                while self.step < total and not self._should_stop():
                    try:
                        metrics = self._train_step()
                        if metrics is None:  # stopped while waiting for a batch
                            break
                        if self._validator is not None and self._validator.due(self.step, total):
                            metrics.update(self.validate())
                        self._record_step(metrics, bar)
                        if cfg.save_freq and self.step % cfg.save_freq == 0:
                            self.save()
                    except LearnerDied as exc:
                        self._restart_from_checkpoint(exc)
                        bar.reset(total=total)
                        bar.update(self.step)
            finally:
                bar.close()
            self._finish()
        return self.last_metrics

    def total_steps(self) -> int:
        """`trainer.total_steps`, or fewer when `trainer.total_epochs` passes over the train
        prompts end first (verl: one step per train_batch_size prompts of each epoch)."""
        cfg = self.cfg.trainer
        if cfg.total_epochs is None:
            return cfg.total_steps
        per_epoch = max(1, ray.get(self.services.driver.num_prompts.remote()) // self.cfg.data.train_batch_size)
        return min(cfg.total_steps, cfg.total_epochs * per_epoch)

    def _should_stop(self) -> bool:
        if self._stop.reason:
            logger.warning("%s at step %d: draining and checkpointing before shutdown", self._stop.reason, self.step)
            return True
        if self._deadline is not None and time.monotonic() >= self._deadline:
            logger.warning("trainer.total_minutes (%g) reached at step %d: draining and checkpointing",
                           self.cfg.trainer.total_minutes, self.step)
            return True
        return False

    def _train_step(self) -> dict | None:
        start = time.perf_counter()
        taken = self._take()
        if taken is None:
            return None
        payload, take_metrics = taken
        wait_s = time.perf_counter() - start
        train_start = time.perf_counter()
        publish = (self.step + 1) % self.cfg.weight_sync.interval == 0
        # The publish rides on the step's own call: one round trip to the ranks per step.
        metrics = self.services.learners.train_step(payload, self.step + 1 if publish else None)
        sync_s = metrics.get("timing/weight_publish_s", 0.0)
        metrics["timing/train_s"] = time.perf_counter() - train_start - sync_s
        self.step += 1
        if publish:
            self._published = self.step
        metrics.update(take_metrics)
        metrics.update({"timing/step_s": time.perf_counter() - start, "timing/wait_batch_s": wait_s,
                        "timing/weight_sync_s": sync_s})
        return metrics

    def _take(self) -> tuple[ray.ObjectRef, dict] | None:
        """The batch of this step, or None when a stop came first (nothing was taken then)."""
        groups = self.cfg.data.train_batch_size
        while True:
            payload, metrics = self.services.buffer.take.options(num_returns=2).remote(groups, self.step, _TAKE_WAIT_S)
            metrics = ray.get(metrics)
            if metrics:
                return payload, metrics
            self._check_driver()
            if self._should_stop():
                return None

    def _check_driver(self) -> None:
        ready, _ = ray.wait([self.services.driver_run], timeout=0)
        if ready:
            ray.get(ready[0])  # raises the driver's error, if any
            raise RuntimeError("the rollout driver stopped while the learner was waiting for data")

    def _record_step(self, metrics: dict, bar: tqdm) -> None:
        # Also the driver's news of the publish: its admission counts staleness from that version.
        status = ray.get(self.services.driver.status.remote(trained_steps=self.step, published_version=self._published))
        metrics.update(record.accounting(status))
        metrics["learner/restarts"] = self._restarts.count
        self.last_metrics = {"step": self.step, "time/elapsed_s": self._elapsed(), **metrics}
        self._faults.check(self.last_metrics)
        self._log.write(self.last_metrics)
        if self._launched_at is not None:
            logger.info("first learner step %.1f s after launch", time.monotonic() - self._launched_at)
            self._launched_at = None
        bar.update(1)
        if self._log.console:
            bar.write(self._log.step_line(self.last_metrics, self._last_val))

    def _elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._started

    # ------------------------------------------------------------------ validation

    def validate(self) -> dict:
        """Score the val split at the weights the generators serve now (see `job.validate`)."""
        self._last_val = self._validator.run(self.step)
        return self._last_val

    def _record_validation(self, metrics: dict, bar: tqdm) -> None:
        """A validation outside a learner step (before training) gets a record of its own."""
        self._log.write({"step": self.step, "time/elapsed_s": self._elapsed(), **metrics})
        if self._log.console:
            bar.write(self._log.validation_line(self.step, metrics))

    # ------------------------------------------------------------------ checkpoints and restarts

    def save(self) -> Path:
        """A complete checkpoint of this step (learner state, data cursor, pending prompts, accounting)."""
        tmp = checkpoint.begin(self.run_dir, self.step)
        self.services.learners.save(str(tmp / "learner"), {"step": self.step})
        driver_state = ray.get(self.services.driver.state_dict.remote(trained_steps=self.step))
        state = {"step": self.step, "elapsed_s": self._elapsed(), "driver": driver_state}
        self._last_checkpoint = checkpoint.commit(tmp, state, self.cfg.checkpoint.max_to_keep)
        return self._last_checkpoint

    def _restart_from_checkpoint(self, exc: LearnerDied) -> None:
        """A learner rank died: rebuild every stateful actor from the last checkpoint (`job.restart`)."""
        self._restarts.admit(exc, self.step, self._last_checkpoint)
        failed_at = time.monotonic()
        elapsed = self._elapsed()
        deploy.stop_services(self.services, self.cfg.ray.namespace)
        self._start_services(self._last_checkpoint)
        self._elapsed_before, self._started = elapsed, failed_at  # wall time never rolls back
        logger.warning("learner restarted: continuing from step %d", self.step)

    # ------------------------------------------------------------------ end of run

    def _finish(self) -> None:
        driver = self.services.driver
        ray.get(driver.pause.remote())
        ray.get(driver.drain.remote(_DRAIN_S))
        self.save()
        counts = record.accounting(ray.get(driver.status.remote(trained_steps=self.step)))
        self.last_metrics.update(counts)
        summary = {**counts, "learner/restarts": self._restarts.count,
                   "generator": deploy.generator_handle().status.remote().result()}
        (self.run_dir / "accounting.json").write_text(json.dumps(summary, indent=1))
        if self.cfg.checkpoint.export_hf:
            self.services.learners.export_hf(str(self.run_dir / "final_hf"))

    def cleanup(self) -> None:
        try:
            if self.services is not None:
                ray.get(self.services.driver.stop.remote())
            serve.shutdown()
            if self.services is not None:
                self.services.learners.shutdown()  # also removes the ranks' rendezvous file
        finally:
            self._log.close()
            (self.run_dir / "ray_address").unlink(missing_ok=True)  # no job to scale any more
            ray.shutdown()


class _StopOnSignal:
    """SIGINT and SIGTERM set `reason` instead of raising (main thread only; restored on exit)."""

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.reason: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self._SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = f"{signal.Signals(signum).name} received"
            logger.warning("%s: stopping after the step in flight (the job then drains and checkpoints)", self.reason)
        else:
            logger.warning("already stopping after the step in flight; SIGKILL stops at once (the last "
                           "checkpoint then resumes with nothing lost)")
