"""The run record: what each learner step leaves in `metrics.jsonl`, on the console, and at the end.

`accounting` and `fault_counters` are pure functions of the driver's status (the driver reads the
buffer's in the same call, so the counts agree). `RunLog` appends one JSON object per record to
`<run_dir>/metrics.jsonl`, writes the progress line, and hands each record to the loggers of
`trainer.logger` (`console`, `tensorboard`, `wandb`); `FaultReport` turns rises of the fault
counters into one warning line per step.

Accounting: every group is dispatched once and ends as exactly one of trained, filtered, stale,
failed, or unfinished (in flight or buffered), so `groups/dispatched == trained + filtered +
stale + failed + unfinished` in every record.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from async_pmd.status import DriverStatus

logger = logging.getLogger(__name__)

# Counters of faults the run survived; a step whose record raises one of them logs a warning line.
FAULT_KEYS = ("driver/retries", "driver/failures/", "scorer/failures/", "buffer/refused", "learner/restarts",
              "learner/refused_batches", "groups/failed")


def accounting(status: DriverStatus) -> dict[str, float]:
    """The `groups/*` counts of the identity above, plus the fault counters."""
    buf = status.buffer
    return {
        "groups/dispatched": status.dispatched, "groups/trained": buf.trained,
        "groups/filtered": buf.filtered, "groups/stale": buf.stale,
        "groups/failed": status.failed + buf.failed + buf.malformed,
        "groups/unfinished": status.unfinished, "groups/duplicate": buf.duplicate,
        "groups/reissued_requests": status.reissued, "driver/backpressure_waits": status.backpressure_waits,
        **fault_counters(status), **{f"partial/{k}": v for k, v in status.partial.items()},
    }


def fault_counters(status: DriverStatus) -> dict[str, float]:
    """Faults survived: re-issues and their causes (exception type), failed reward calls by reason
    (all scorer replicas), and wire messages the buffer refused. The driver's counters start at 0
    with each driver process; the buffer's are checkpointed."""
    counters = {"driver/retries": status.retries, "driver/deterministic_failures": status.deterministic_failures,
                "driver/max_attempt": status.max_attempt, "buffer/refused": status.buffer.refused}
    counters.update({f"driver/failures/{kind}": n for kind, n in status.failures.items()})
    counters.update({f"scorer/failures/{reason}": n for reason, n in status.buffer.reward_failures.items()})
    return counters


class FaultReport:
    """One warning line for a record that raised a fault counter (see `FAULT_KEYS`)."""

    def __init__(self):
        self._seen: dict[str, float] = {}  # fault counters of the previous record

    def check(self, record: dict) -> None:
        faults = {k: v for k, v in record.items() if k.startswith(FAULT_KEYS)}
        rises = [f"{k} +{v - self._seen.get(k, 0):g}" for k, v in sorted(faults.items()) if v > self._seen.get(k, 0)]
        if rises:
            logger.warning("faults survived by step %s: %s", record.get("step"), ", ".join(rises))
        self._seen = faults


class RunLog:
    """`metrics.jsonl` (append-only, one object per record), the console line of each step, and
    the optional TensorBoard / W&B loggers, opened on the first record."""

    def __init__(self, run_dir: Path, samples_per_step: int, loggers: tuple[str, ...] = ("console",),
                 project: str = "async_pmd", experiment: str = "run", config: dict | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.console = "console" in loggers
        self._samples_per_step = samples_per_step
        self._run_dir, self._loggers, self._names, self._config = run_dir, loggers, (project, experiment), config
        self._tensorboard = self._wandb = None

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not {"tensorboard", "wandb"} & set(self._loggers):
            return
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if "tensorboard" in self._loggers:
            self._tensorboard = self._tensorboard or self._open_tensorboard()
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, record["step"])
            self._tensorboard.flush()
        if "wandb" in self._loggers:
            self._wandb = self._wandb or self._open_wandb()
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()

    def _open_tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self._run_dir / "tensorboard"))

    def _open_wandb(self):
        import wandb

        # Offline unless the user says otherwise: nothing leaves the machine by default.
        (self._run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        return wandb.init(project=self._names[0], name=self._names[1], dir=str(self._run_dir),
                          mode=os.environ.get("WANDB_MODE", "offline"), config=self._config, reinit="create_new")

    def roll_back(self, step: int) -> None:
        """Keep only the records of steps <= `step` (a resume from that checkpoint): the steps a
        killed run made after it are done again, and each step is in the file once. Atomic."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) == len(lines):
            return
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        logger.warning("metrics.jsonl rolled back to step %d (%d records past it dropped)", step, len(lines) - len(kept))

    def step_line(self, record: dict, last_val: dict) -> str:
        samples_s = self._samples_per_step / max(record["timing/step_s"], 1e-9)
        nan = math.nan
        return (f"step {record['step']:>5}  reward {record.get('reward/mean', nan):.3f}  "
                f"kl {record.get('actor/pmd_kl', nan):+.4f}  staleness {record.get('staleness/mean', nan):.2f}  "
                f"entropy {record.get('actor/entropy', nan):.3f}  {samples_s:,.0f} samples/s"
                + (f"  val {last_val['val/reward/mean']:.3f}" if last_val else ""))

    @staticmethod
    def validation_line(step: int, metrics: dict) -> str:
        return (f"validation at step {step}: reward {metrics['val/reward/mean']:.3f}  "
                f"pass@n {metrics['val/pass@n']:.3f}  mean@n {metrics['val/mean@n']:.3f}")
