"""Test hooks of the fault-tolerance tests, off unless their environment variables are set.

* ``RAYDIFF_FAULT_EXIT_AT_STEP=N``: every training worker process exits hard (``os._exit``,
  no cleanup, like a killed process) right after step N, once its checkpoint, if any, has been
  handed to Ray Train. Re-running the same command then resumes the run.
* ``RAYDIFF_FAULT_NAN_AT_STEP=N``: the batch of step N is poisoned with NaN once per process
  (train/divergence.py), to test the rollback on a real run.
* ``RAYDIFF_FAULT_WRITE_DELAY_S=X``: every rank waits X seconds before it commits each checkpoint
  (after writing it, before moving or uploading it into the run: persist.py), like an upload
  slowed by a loaded machine; to test that a run whose lease was taken over meanwhile commits
  nothing (storage/fence.py).
* ``RAYDIFF_RECORD_SAMPLE_IDS=DIR``: every rank appends one JSON line per step,
  ``{"rank", "epoch", "step", "position", "ids"}`` (the ids of the samples of its micro-batch: file, or
  ``shard#j``), to ``DIR/rank{r}.jsonl`` on its node, to compare what runs trained on. Redone
  steps after a resume appear again; the last line of a (rank, step) is the one that counts.

The variables are set where the run is started: the driver reads them once into ``FaultHooks``
(``FaultHooks.from_env()``) and hands that to every worker in its arguments; the workers read no
environment.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

EXIT_ENV = "RAYDIFF_FAULT_EXIT_AT_STEP"
NAN_ENV = "RAYDIFF_FAULT_NAN_AT_STEP"
RECORD_ENV = "RAYDIFF_RECORD_SAMPLE_IDS"
WRITE_DELAY_ENV = "RAYDIFF_FAULT_WRITE_DELAY_S"


def _step(raw: str | None) -> int | None:
    raw = (raw or "").strip()
    return int(raw) if raw.isdigit() else None


def _seconds(raw: str | None) -> float:
    try:
        return max(0.0, float(raw)) if raw else 0.0
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class FaultHooks:
    exit_at_step: int | None = None
    nan_at_step: int | None = None
    record_sample_ids_dir: str | None = None
    write_delay_s: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "FaultHooks":
        return cls(exit_at_step=_step(env.get(EXIT_ENV)), nan_at_step=_step(env.get(NAN_ENV)),
                   record_sample_ids_dir=env.get(RECORD_ENV) or None,
                   write_delay_s=_seconds(env.get(WRITE_DELAY_ENV)))

    def exit_if_due(self, step: int) -> None:
        if self.exit_at_step is not None and self.exit_at_step == step:
            print(f"raydiff: {EXIT_ENV}={step}: this worker exits now", flush=True)
            os._exit(17)


class SampleRecorder:
    """The ``RAYDIFF_RECORD_SAMPLE_IDS`` hook of one rank (a no-op when ``directory`` is None)."""

    def __init__(self, rank: int, directory: str | None):
        self.rank = rank
        self.path = Path(directory) / f"rank{rank}.jsonl" if directory else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __bool__(self) -> bool:
        return self.path is not None

    def record(self, **fields: Any) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"rank": self.rank, **fields}) + "\n")
