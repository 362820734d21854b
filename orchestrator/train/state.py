"""Where training is: the explicit state saved with every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    epoch: int = 0
    # Optimizer steps taken in the current epoch (informational: the position is the next field).
    batch_in_epoch: int = 0
    # The data position: source samples of the current epoch consumed by all ranks together, in
    # the epoch's fixed order (orchestrator/data/position.py). The consumed samples are exactly
    # the first ``samples_in_epoch`` of that order, so a resume on any number of workers
    # continues at the next sample. None before the first step, and in checkpoints written before it
    # existed (then ``batch_in_epoch`` x the global batch).
    samples_in_epoch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def epoch_position(self, global_batch: int) -> int:
        """``samples_in_epoch``, derived for old checkpoints that only recorded batches."""
        return self.samples_in_epoch if self.samples_in_epoch is not None else self.batch_in_epoch * global_batch
