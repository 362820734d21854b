"""Ray Train's controller, draining the workers' reports as fast as they come.

Ray Train 2.60's controller polls its workers once per ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s
by default, 0.5 s on raydiff's local Ray) and takes at most one report per worker per poll: a
worker's ``ray.train.report`` goes through a queue of size one
(ray/train/v2/_internal/execution/worker_group/worker.py ``poll_status``). raydiff reports at
every checkpoint and hands the checkpoint over with ``CheckpointUploadMode.ASYNC``, so training
does not wait, but every checkpoint after the first waits in the worker for a poll before Ray Train
registers it: with checkpoints more often than the interval, the run's newest registered
checkpoint (the one a restarted worker group resumes from, the "checkpoint" events that
``raydiff`` and the job controller follow) falls further behind training at every checkpoint, and
the run ends only when the last one has been taken, one interval per queued report. Measured on
the 2-core machine (a Ray Job run, 60 steps of 0.1 s, a checkpoint every 2 steps, 2026-12-07):
training ended 46 s before the run did, and a kill at step 45 resumed from step 8 (issue 18).

This controller polls again at once after a poll that took a report, and keeps Ray's interval
otherwise: a run's reports are registered as fast as the controller can process them, and the
interval still paces the health checks of a group that has nothing to say.

A module of its own, free of torch: the controller process unpickles this class.
"""

from __future__ import annotations

try:
    from ray.train.v2._internal.execution.controller import TrainController
except ImportError:  # another Ray Train layout: Ray's own controller is used (train/trainer.py)
    TrainController = None


if TrainController is not None:
    class ReportDrainingController(TrainController):
        """``TrainController`` that skips the wait before its next poll while reports arrive."""

        async def _poll_workers(self):
            if getattr(self, "_took_report", False):
                self._latest_poll_time = float("-inf")  # Ray's own "no poll yet": no wait
            status = await super()._poll_workers()
            self._took_report = any(s.training_report is not None for s in status.worker_statuses.values())
            return status
else:
    ReportDrainingController = None
