"""The run record: metrics.jsonl rolled back to a checkpoint keeps each step once; the
TensorBoard and (offline) W&B loggers of `trainer.logger` write their files."""

import json
import os

from job.record import RunLog


def records(n: int, start: int = 1) -> list[dict]:
    return [{"step": s, "timing/step_s": 0.1, "reward/mean": s / 10} for s in range(start, start + n)]


def test_roll_back_keeps_the_surviving_timeline(tmp_path):
    log = RunLog(tmp_path, samples_per_step=256)
    for r in records(12):
        log.write(r)
    log.roll_back(10)  # a resume from the checkpoint of step 10
    for r in records(5, start=11):
        log.write(r)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 16))


def test_tensorboard_and_offline_wandb_write_their_files(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default, not the environment's
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLog(tmp_path, 256, ("tensorboard", "wandb"), "proj", "exp", {"trainer": {"seed": 0}})
    for r in records(3):
        log.write(r)
    log.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("reward/mean")] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), os.listdir(tmp_path / "wandb")
