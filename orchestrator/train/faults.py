"""Test hooks of the fault-tolerance tests, off unless their environment variables are set.

* ``RAYDIFF_FAULT_EXIT_AT_STEP=N``: every training worker process exits hard (``os._exit``,
  no cleanup, like a killed process) right after step N, once its checkpoint, if any, has been
  handed to Ray Train. Re-running the same command then resumes the run.
* ``RAYDIFF_RECORD_SAMPLE_IDS=DIR``: every rank appends one JSON line per step,
  ``{"rank", "epoch", "step", "position", "ids"}`` (the ids of the samples of its micro-batch: file, or
  ``shard#j``), to ``DIR/rank{r}.jsonl`` on its node, to compare what runs trained on. Redone
  steps after a resume appear again; the last line of a (rank, step) is the one that counts.

The driver forwards them, with ``RAYDIFF_FAULT_NAN_AT_STEP`` (train/divergence.py), to the
workers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from orchestrator.train.divergence import FAULT_ENV as NAN_ENV

EXIT_ENV = "RAYDIFF_FAULT_EXIT_AT_STEP"
RECORD_ENV = "RAYDIFF_RECORD_SAMPLE_IDS"
FORWARDED = (NAN_ENV, EXIT_ENV, RECORD_ENV)


def forwarded_env() -> dict[str, str]:
    """The hooks set in this process's environment, for the workers' runtime environment."""
    return {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}


def exit_if_due(step: int) -> None:
    raw = os.environ.get(EXIT_ENV, "").strip()
    if raw.isdigit() and int(raw) == step:
        print(f"raydiff: {EXIT_ENV}={raw}: this worker exits now", flush=True)
        os._exit(17)


class SampleRecorder:
    def __init__(self, rank: int):
        d = os.environ.get(RECORD_ENV)
        self.rank = rank
        self.path = Path(d) / f"rank{rank}.jsonl" if d else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __bool__(self) -> bool:
        return self.path is not None

    def record(self, **fields: Any) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"rank": self.rank, **fields}) + "\n")
