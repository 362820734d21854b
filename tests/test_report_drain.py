"""Ray Train's controller takes at most one report per worker per poll and waits its poll interval
between polls; raydiff's controller polls again at once after a poll that took a report
(orchestrator/train/report_drain.py). Ray's own ``_poll_workers`` runs here against a worker group
whose workers have reports queued, with the interval's sleep recorded instead of slept."""

from __future__ import annotations

import asyncio

import pytest
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.controller import controller as controller_module
from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus, WorkerStatus

from orchestrator.train.report_drain import ReportDrainingController

INTERVAL_S = 30.0


class QueuedReports:
    """A worker group whose rank ``r`` has ``queued[r]`` reports waiting: one leaves per poll (the
    worker's result queue holds one; the next report is put as soon as it is taken)."""

    def __init__(self, *queued: int):
        self.queued = list(queued)
        self.taken: list[int] = []  # reports taken, per poll

    def poll_status(self, timeout: float) -> WorkerGroupPollStatus:
        statuses = {}
        for rank, n in enumerate(self.queued):
            statuses[rank] = WorkerStatus(running=True, training_report=f"report of rank {rank}" if n else None)
            self.queued[rank] = max(n - 1, 0)
        self.taken.append(sum(s.training_report is not None for s in statuses.values()))
        return WorkerGroupPollStatus(worker_statuses=statuses)


class _State:
    def is_terminal(self) -> bool:
        return False


def _polls(cls: type, workers: QueuedReports, n: int, monkeypatch) -> list[float]:
    """Run ``n`` polls of a ``cls`` controller; return the waits before each (0: none)."""
    controller = object.__new__(cls)  # only what _poll_workers reads
    controller._health_check_interval_s = INTERVAL_S
    controller._latest_poll_time = float("-inf")
    controller._worker_group = workers
    controller.get_state = _State
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits[-1] = seconds

    monkeypatch.setattr(controller_module.asyncio, "sleep", sleep)

    async def run() -> None:
        for _ in range(n):
            waits.append(0.0)
            await controller._poll_workers()

    asyncio.run(run())
    return waits


def test_queued_reports_are_taken_without_waiting_between_polls(monkeypatch):
    workers = QueuedReports(3, 1)  # rank 0 reported three times (checkpoints), rank 1 once
    waits = _polls(ReportDrainingController, workers, 5, monkeypatch)
    assert workers.taken == [2, 1, 1, 0, 0]
    # No wait while reports came; the interval again once a poll took none.
    assert waits[:4] == [0.0, 0.0, 0.0, 0.0] and waits[4] == pytest.approx(INTERVAL_S, abs=1.0)


def test_ray_trains_own_controller_waits_an_interval_per_queued_report(monkeypatch):
    """What the subclass changes: Ray's controller spends an interval per report queued behind the
    first (60 s here for the three reports of rank 0)."""
    workers = QueuedReports(3, 1)
    waits = _polls(TrainController, workers, 3, monkeypatch)
    assert workers.taken == [2, 1, 1]
    assert waits[0] == 0.0 and waits[1:] == [pytest.approx(INTERVAL_S, abs=1.0)] * 2
