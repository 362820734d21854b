"""After a checkpoint is durable: its ``checkpoint`` record in events.jsonl, then pruning.

Each rank persists its part of a checkpoint in the background (persist.py); Ray Train calls a
``UserCallback``'s ``after_report`` on its controller only when every rank's report has arrived,
and with ``checkpoint_upload_mode=ASYNC`` a rank reports only after its upload function returned,
that is after its manifest was committed. Recording the event there, not when the step handed
the checkpoint over, means events.jsonl never lists a checkpoint that is not on storage (a
resume would otherwise start from an older one than the log promises). Written through the
lease holder's fenced run directory (storage/fence.py).

Pruning to ``checkpoint.keep`` happens here too, instead of by Ray Train (``num_to_keep``): fenced
like every other write, so a driver whose lease was taken over deletes nothing, and during the
run, so a run that fails (``run.max_failures=0``) leaves ``keep`` checkpoints, not all of them.
"""

from __future__ import annotations

import posixpath
import time
from typing import Any

from ray.train import UserCallback

from orchestrator.storage import RunDir, join
from orchestrator.train.checkpoint.layout import checkpoint_step


class CheckpointEvents(UserCallback):
    def __init__(self, rundir: RunDir, keep: int):
        self.rundir, self.keep = rundir, keep

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is None:
            return
        from orchestrator.storage.lease import LeaseLost
        from orchestrator.train.checkpoint.manager import Checkpointer

        name = posixpath.basename(checkpoint.path.rstrip("/"))
        try:
            self.rundir.event({"event": "checkpoint", "step": checkpoint_step(name),
                               "checkpoint": join(self.rundir.uri, name), "time": time.time()})
            Checkpointer(self.rundir).prune(self.keep, protect=name)
        except LeaseLost:
            # Refused, as it should be: the lease was taken over. Raised here it would be Ray
            # Train's controller traceback; the driver's own fence check ends the run with one line.
            return
