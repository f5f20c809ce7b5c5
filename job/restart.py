"""What the job does when a learner rank dies: roll the whole run back to its last checkpoint.

The weights and optimizer lived only in the ranks, so the learner restarts from the last
checkpoint. Rolling back only the learner would leave the buffer's counts, the driver's ledger
and the data cursor ahead of it (groups counted as trained whose updates are lost) and the
generators serving weights the new learner never reaches. So every actor holding run state is
rebuilt from that checkpoint, exactly as `trainer.resume=auto` resumes a run: step, cursor and
accounting continue from the checkpoint, and the work done since it is done again. Without a
checkpoint yet, the run starts over. Wall time never rolls back.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class LearnerRestarts:
    """Counts learner failures against `trainer.max_learner_restarts`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0

    def admit(self, exc: BaseException, step: int, checkpoint: Path | None) -> None:
        """Count one failure at `step`; raises RuntimeError (from `exc`) past the limit."""
        self.count += 1
        if self.count > self.limit:
            raise RuntimeError(f"learner failed {self.count} times "
                               f"(trainer.max_learner_restarts={self.limit})") from exc
        logger.error("learner failure at step %d (%s): restart %d of %d from %s", step, exc, self.count,
                     self.limit, checkpoint or "the start")
