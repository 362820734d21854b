"""Where training is: the explicit state saved with every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    epoch: int = 0
    # Batches of the current epoch already trained on: after a resume the epoch is re-read and
    # this many batches are skipped (Ray Data has no mid-epoch iterator resume).
    batch_in_epoch: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
