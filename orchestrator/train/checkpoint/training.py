"""The checkpoint owner inside a Ray Train worker: restore, save and roll back through the engine.

``TrainCheckpointer`` adds to ``Checkpointer`` (manager.py) what needs the DeepSpeed engine and
the EMA: which checkpoint a worker group starts from, writing and persisting each checkpoint
(staged, handed to Ray Train with ASYNC upload, manifest written by PersistCheckpoint) and
reloading the last good one when training diverged. Rank 0 records resumes and warm starts in
events.jsonl.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import ray.train
import torch.distributed as dist
from ray.train import Checkpoint
from ray.train.v2.api.report_config import CheckpointUploadMode

from model.ema import EMA
from orchestrator.config import TrainConfig
from orchestrator.storage import fenced_rundir, ray_storage
from orchestrator.train.checkpoint.files import read_checkpoint, write_checkpoint
from orchestrator.train.checkpoint.layout import checkpoint_dir_name
from orchestrator.train.checkpoint.manager import Checkpointer
from orchestrator.train.checkpoint.persist import PersistCheckpoint, staging_dir
from orchestrator.train.checkpoint.warmstart import apply_hyperparameters
from orchestrator.train.state import TrainState


@dataclass(frozen=True)
class Restored:
    state: TrainState
    source: str | None  # the checkpoint URI it came from; None: nothing was loaded
    how: str | None = None  # "resumed" (this run's checkpoint) or "initialized" (another run's)


class TrainCheckpointer(Checkpointer):
    def __init__(self, cfg: TrainConfig, *, engine: Any, ema: EMA, rank: int, world: int, num_classes: int | None,
                 class_names: list[str] | None = None, resume_from: str | None = None,
                 init_checkpoint: str | None = None, holder: str | None = None, write_delay_s: float = 0.0):
        # ``holder``: the driver's lease holder id; every write to the run is fenced by it.
        super().__init__(fenced_rundir(cfg, holder))
        self.write_delay_s = write_delay_s  # the write-delay test hook (train/faults.py)
        self.cfg, self.engine, self.ema, self.rank, self.world = cfg, engine, ema, rank, world
        self.num_classes, self.class_names = num_classes, class_names
        # The newest checkpoint of this run that verified (chosen by the driver), and another
        # run's checkpoint to start from when this run has none (population-based training).
        self.resume_from, self.init_checkpoint = resume_from, init_checkpoint

    def _read_uri(self, uri: str) -> TrainState:
        path, fs = ray_storage(uri, self.cfg.storage.s3)
        with Checkpoint(path, filesystem=fs).as_directory() as d:
            return read_checkpoint(d, engine=self.engine, ema=self.ema)

    def _read(self, ckpt: Checkpoint) -> TrainState:
        with ckpt.as_directory() as d:
            return read_checkpoint(d, engine=self.engine, ema=self.ema)

    def _agreed_newer(self, known: str | None) -> str | None:
        """``newer_good`` chosen by rank 0 and broadcast, so that every rank loads the same
        checkpoint even if another one lands meanwhile."""
        choice = [self.newer_good(known) if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def _event(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            self.rundir.event({**record, "time": time.time()})

    def restore(self) -> Restored:
        """Continue from, in order: a verified checkpoint persisted after the one Ray Train
        registered (a worker group restarted between persisting and registering), the checkpoint
        Ray Train registered in this invocation (a worker group restarted after a failure), the
        run's newest verified checkpoint (chosen by the driver), or another run's checkpoint
        (``init_checkpoint``, with this run's hyperparameters: warmstart.py). With none of them
        the run starts at step 0."""
        ckpt = ray.train.get_checkpoint()
        newer = self._agreed_newer(ckpt.path if ckpt is not None else self.resume_from)
        if newer is not None:
            restored = Restored(self._read_uri(newer), newer, "resumed")
        elif ckpt is not None:
            restored = Restored(self._read(ckpt), ckpt.path, "resumed")
        elif self.resume_from:
            restored = Restored(self._read_uri(self.resume_from), self.resume_from, "resumed")
        elif self.init_checkpoint:
            state = self._read_uri(self.init_checkpoint)
            apply_hyperparameters(self.engine, self.ema, self.cfg)
            restored = Restored(state, self.init_checkpoint, "initialized")
        else:
            return Restored(TrainState(), None)
        s = restored.state
        if self.rank == 0 and restored.how == "resumed":
            print(f"raydiff: resumed from {restored.source} at step {s.step} "
                  f"(epoch {s.epoch}, sample {s.samples_in_epoch or 0} of the epoch)", flush=True)
        # Durable record too: console lines from workers can be lost when a driver dies.
        self._event({"event": restored.how, "checkpoint": restored.source, **s.as_dict()})
        return restored

    def save(self, state: TrainState, metrics: dict[str, Any]) -> float:
        """Write this rank's checkpoint and hand it to Ray Train, which persists it in the
        background (local run directories: a rename; object storage: an upload) while training
        continues. Returns the seconds training was stalled."""
        t0 = time.perf_counter()
        run_uri = self.rundir.uri
        fence = self.rundir.fence
        if fence is not None:
            fence.check()  # a driver whose lease was taken over stops at its next checkpoint
        staged = staging_dir(run_uri, state.step, self.rank, fence.holder_id if fence is not None else None)
        write_checkpoint(staged, engine=self.engine, ema=self.ema, state=state, cfg=self.cfg,
                         num_classes=self.num_classes, rank=self.rank, class_names=self.class_names)
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(staged),
            checkpoint_dir_name=checkpoint_dir_name(state.step),
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
            checkpoint_upload_fn=PersistCheckpoint(run_uri, self.cfg.storage.s3, rank=self.rank, world=self.world,
                                                   step=state.step, fence=fence,
                                                   delay_s=self.write_delay_s),
            delete_local_checkpoint_after_upload=False,  # PersistCheckpoint moves or removes the staged files
        )
        # No "checkpoint" event here: the upload goes on in the background. The driver's
        # CheckpointEvents records it once every rank's part is committed.
        return time.perf_counter() - t0

    def rollback(self, state: TrainState) -> Restored | None:
        """Reload the last good checkpoint of this run (None: there is none yet). The returned
        state has the checkpoint's step and samples seen and keeps ``state``'s data position, so
        training moves on past the batches in between."""
        ckpt = ray.train.get_checkpoint()  # the newest persisted in this invocation
        if ckpt is not None:
            source, good = ckpt.path, self._read(ckpt)
        elif self.resume_from:
            source, good = self.resume_from, self._read_uri(self.resume_from)
        else:
            return None
        return Restored(dataclasses.replace(state, step=good.step, samples_seen=good.samples_seen), source, "rollback")
