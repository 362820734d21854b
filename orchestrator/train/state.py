"""Where training is: the explicit state saved with every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.data.position import LEGACY_ORDER, ORDER_VERSION, ORDER_VERSIONS


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
    # The version of the epoch's order that ``samples_in_epoch`` counts in (ORDER_VERSION of
    # orchestrator/data/position.py), so that a change of the order never moves a saved position:
    # an epoch finishes in the order it started. None until the epoch's first step, and in
    # checkpoints written before versions existed (then version 1 mid-epoch).
    data_order: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def epoch_position(self, global_batch: int) -> int:
        """``samples_in_epoch``, derived for old checkpoints that only recorded batches."""
        return self.samples_in_epoch if self.samples_in_epoch is not None else self.batch_in_epoch * global_batch

    def order_version(self, global_batch: int) -> int:
        """The order the current epoch continues in: the saved one; version 1 for a checkpoint
        written mid-epoch before versions existed; the current one at an epoch's start."""
        if self.data_order is not None:
            if self.data_order not in ORDER_VERSIONS:
                raise ValueError(f"the checkpoint's data position uses epoch order version {self.data_order}, "
                                 f"which this raydiff does not know (it knows {ORDER_VERSIONS}). Fix: resume "
                                 "with the raydiff version that wrote it (or a newer one)")
            return self.data_order
        return LEGACY_ORDER if self.epoch_position(global_batch) > 0 else ORDER_VERSION
