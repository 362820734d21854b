"""What rank 0 writes and shows while training: events, the tracking fan-out (metrics.jsonl and
the enabled sinks), model FLOPs utilisation, sample grids and the progress bar. On the other
ranks every method does nothing, so the training loop calls them without asking its rank."""

from __future__ import annotations

import time
from typing import Any

import torch

from orchestrator.config import TrainConfig, config_to_dict
from orchestrator.plan import Plan
from orchestrator.storage import fenced_rundir
from orchestrator.tracking import Tracker, build_tracker
from orchestrator.tracking.mfu import MfuMeter
from orchestrator.train.progress import Progress


class RankZeroOutputs:
    def __init__(self, cfg: TrainConfig, plan: Plan, *, rank: int, world: int, num_classes: int | None,
                 device: torch.device, progress: str, holder: str | None = None):
        self.cfg, self.plan, self.world, self.num_classes, self.device = cfg, plan, world, num_classes, device
        self.progress_mode = progress
        # Fenced by the driver's lease (``holder``): nothing is written after a takeover.
        self.rundir = fenced_rundir(cfg, holder) if rank == 0 else None
        self.tracker: Tracker | None = None
        self.mfu: MfuMeter | None = None
        self.bar: Progress | None = None

    @property
    def active(self) -> bool:
        return self.rundir is not None

    def start(self, step: int) -> None:
        """Open the outputs once the step training continues from is known (redone steps after
        it are dropped from the logs)."""
        if self.rundir is None:
            return
        cfg = self.cfg
        self.tracker = build_tracker(cfg, self.rundir.uri, resume_step=step, params=config_to_dict(cfg),
                                     fence=self.rundir.fence)
        self.mfu = MfuMeter(cfg, self.num_classes, device=self.device, precision=self.plan.precision, world=self.world)
        if self.progress_mode != "off":
            self.bar = Progress(self.progress_mode, name=cfg.run.name, total=cfg.optim.steps, start_step=step,
                                every_s=cfg.logging.progress_every_s)

    def event(self, record: dict[str, Any]) -> None:
        if self.rundir is not None:
            self.rundir.event(record)

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.step(step)

    def log(self, rec: dict[str, Any]) -> None:
        """A metrics record (rank 0's copy of the reduced window), with MFU where it is known."""
        if self.tracker is None:
            return
        if self.mfu is not None and self.mfu.peak and "images_per_s" in rec:
            rec["mfu"] = self.mfu(rec["images_per_s"])
        self.tracker.log(rec)
        if self.bar is not None and "loss" in rec:
            self.bar.logged(rec)

    def grid(self, step: int, png: bytes) -> None:
        if self.rundir is None:
            return
        self.rundir.write_bytes(f"samples/step_{step:07d}.png", png)
        if self.tracker is not None:
            self.tracker.image(step, png)

    def checkpoint(self, step: int, uri: str, stall_s: float) -> None:
        if self.rundir is not None:
            # The logs were flushed before the checkpoint: their parts since the last one become
            # one segment (S3 only), so reading a month-long run's logs costs a request per checkpoint.
            self.rundir.compact_logs()
        if self.bar is not None:
            self.bar.checkpoint(step, uri, stall_s)

    def rollback(self, reason: str, at: int, to: int, source: str, count: str) -> None:
        if self.tracker is not None:
            self.tracker.rewind(to)
        if self.rundir is None:
            return
        print(f"raydiff: {reason} at step {at}: rolled back to {source} (step {to}), "
              f"skipping the batches in between ({count})", flush=True)
        self.rundir.event({"event": "rollback", "reason": reason, "from_step": at, "to_step": to,
                           "checkpoint": source, "time": time.time()})

    def flush(self) -> None:
        if self.tracker is not None:
            self.tracker.flush()

    def close(self) -> None:
        try:
            if self.tracker is not None:
                self.tracker.close()
        finally:
            if self.bar is not None:
                self.bar.close()
