"""The Ray Train worker: build from config, take the dataset shard, train, report, resume.

Everything here runs inside a Ray Train worker process, where Ray has already set up
torch.distributed. The step itself is ``TrainStep`` (train/step.py), the checkpoint layout is in
train/checkpoints.py and the metrics window in train/metrics.py; this module only wires them to
Ray: the dataset shard, ``ray.train.report`` with checkpoints, resume from
``ray.train.get_checkpoint()``, rank 0's run-directory writes and the progress bar.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.config import TrainConfig, validate_config
from orchestrator.plan import Plan
from orchestrator.sampling import sample_grid
from orchestrator.storage import RunDir, retry_counts
from orchestrator.storage.rundir import METRICS_LOG
from orchestrator.train.checkpoints import (
    build_denoiser,
    checkpoint_dir_name,
    read_checkpoint,
    read_checkpoint_uri,
    write_checkpoint,
)
from orchestrator.train.persist import PersistCheckpoint, staging_dir
from orchestrator.train.divergence import DivergenceError, DivergenceGuard
from orchestrator.train.faults import exit_if_due
from orchestrator.train.metrics import MetricsWindow
from orchestrator.train.startup import phase_event
from orchestrator.train.state import TrainState
from orchestrator.train.step import TrainStep

log = logging.getLogger("raydiff.train")


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands each worker (plain data: it crosses process boundaries)."""

    config: dict[str, Any]  # with secrets revealed: in memory only, never written
    plan: dict[str, Any]
    num_classes: int | None
    bad_counter: str | None
    # Object ref of the held-out images (data.load_validation_images) when validating.
    val_images: Any = None
    # Checkpoint directory URI to start from when the run has none of its own (a population-based
    # training trial continuing from another trial's checkpoint), with this run's hyperparameters.
    init_checkpoint: str | None = None
    # The newest checkpoint of this run that verified (train/verify.py), chosen by the driver.
    resume_from: str | None = None
    # The dataset's class names (index order), saved in model.json; None for unconditional runs.
    class_names: list[str] | None = None
    # How rank 0 shows progress (orchestrator.logs.progress_mode, decided on the driver: a worker's
    # stdout is never a terminal) and whether library messages stay on (--verbose).
    progress: str = "off"
    verbose: bool = False
    # Object ref of the training data's reader (orchestrator.data.reader.TrainReader): every rank
    # reads its exact slice of each epoch through it.
    reader: Any = None


class Worker:
    def __init__(self, cfg: TrainConfig, plan: Plan, num_classes: int | None, bad_counter: str | None,
                 val_images: Any = None, init_checkpoint: str | None = None, resume_from: str | None = None,
                 class_names: list[str] | None = None, progress: str = "off", reader: Any = None):
        import ray.train

        self.cfg, self.plan, self.num_classes, self.bad_counter = cfg, plan, num_classes, bad_counter
        self.init_checkpoint, self.resume_from = init_checkpoint, resume_from
        self.class_names = class_names
        self.progress_mode = progress
        self.reader_ref = reader
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_world = ctx.get_local_world_size()
        if plan.device == "gpu":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
            # Ray sets OMP_NUM_THREADS to the worker's CPU share; torch's intra-op pool must
            # match or two workers on two cores fight over 4 threads.
            torch.set_num_threads(max(1, int(plan.cpus_per_worker)))
        self.train = TrainStep(cfg, plan, num_classes, device=self.device, rank=self.rank)
        self.guard = DivergenceGuard(cfg.run.max_rollbacks, cfg.precision.min_loss_scale,
                                     engine_fp16=plan.precision == "fp16" and not plan.autocast)
        self.state = TrainState()
        self.rundir = RunDir.for_config(cfg) if self.rank == 0 else None
        self.metrics_log = self.rundir.log(METRICS_LOG) if self.rundir is not None else None
        self._sample_model: torch.nn.Module | None = None
        self.tracker = self.mfu = None  # rank 0, from fit() once the start step is known
        self.validator = None
        if val_images is not None and cfg.logging.val_every_steps:
            import ray

            from model.conditioning import class_conditioning
            from orchestrator.train.validation import Validator

            held = ray.get(val_images)
            self.validator = Validator(held["image"], class_conditioning(held.get("label"), num_classes),
                                       self.train.objective, timesteps=cfg.logging.val_timesteps, seed=cfg.data.seed,
                                       rank=self.rank, world=self.world, device=self.device,
                                       batch_size=plan.micro_batch_size)

    # -- checkpoints ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from, in order: a verified checkpoint persisted after the one Ray Train
        registered (a worker group restarted between persisting and registering), the checkpoint
        Ray Train registered in this invocation (a worker group restarted after a failure), the
        run's newest verified checkpoint (chosen by the driver), or another run's checkpoint
        (``init_checkpoint``, population-based training). With none of them the run starts at
        step 0."""
        import ray.train

        from orchestrator.train.verify import agreed_newer_checkpoint

        ckpt = ray.train.get_checkpoint()
        newer = agreed_newer_checkpoint(RunDir.for_config(self.cfg), ckpt.path if ckpt is not None else self.resume_from,
                                        rank=self.rank, world=self.world)
        if newer is not None:
            self.state = read_checkpoint_uri(newer, self.cfg.storage.s3, engine=self.train.engine, ema=self.train.ema)
            self._record_resume(newer)
        elif ckpt is not None:
            with ckpt.as_directory() as d:
                self.state = read_checkpoint(d, engine=self.train.engine, ema=self.train.ema)
            self._record_resume(ckpt.path)
        elif self.resume_from:
            self.state = read_checkpoint_uri(self.resume_from, self.cfg.storage.s3, engine=self.train.engine,
                                             ema=self.train.ema)
            self._record_resume(self.resume_from)
        elif self.init_checkpoint:
            from orchestrator.train.warmstart import load_initial_checkpoint

            self.state = load_initial_checkpoint(self.init_checkpoint, self.cfg.storage.s3, engine=self.train.engine,
                                                 ema=self.train.ema, cfg=self.cfg)
            if self.rundir is not None:
                self.rundir.event({"event": "initialized", "checkpoint": self.init_checkpoint, "time": time.time(),
                                   **self.state.as_dict()})
        elif self.metrics_log is not None:
            self.metrics_log.rewind(0)  # a worker group restarted before any checkpoint redoes every step

    def _record_resume(self, where: str) -> None:
        if self.rundir is None:
            return
        if self.metrics_log is not None:
            self.metrics_log.rewind(self.state.step)  # steps after the checkpoint are redone
        print(f"raydiff: resumed from {where} at step {self.state.step} "
              f"(epoch {self.state.epoch}, sample {self.state.samples_in_epoch or 0} of the epoch)", flush=True)
        # Durable record too: console lines from workers can be lost when a driver dies.
        self.rundir.event({"event": "resumed", "checkpoint": where, "time": time.time(), **self.state.as_dict()})

    def save_and_report(self, metrics: dict[str, Any]) -> float:
        """Write this rank's checkpoint and hand it to Ray Train, which persists it in the
        background (local run directories: a rename; object storage: an upload) while
        training continues. Returns the seconds training was stalled."""
        import ray.train
        from ray.train import Checkpoint
        from ray.train.v2.api.report_config import CheckpointUploadMode

        t0 = time.perf_counter()
        if self.metrics_log is not None:
            self.metrics_log.flush()  # the history reaches storage with every checkpoint
        if self.tracker is not None:
            self.tracker.flush()
        run_uri = RunDir.for_config(self.cfg).uri
        staged = staging_dir(run_uri, self.state.step, self.rank)
        write_checkpoint(staged, engine=self.train.engine, ema=self.train.ema, state=self.state, cfg=self.cfg,
                         num_classes=self.num_classes, rank=self.rank, class_names=self.class_names)
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(staged),
            checkpoint_dir_name=checkpoint_dir_name(self.state.step),
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
            checkpoint_upload_fn=PersistCheckpoint(run_uri, self.cfg.storage.s3, rank=self.rank, world=self.world,
                                                   step=self.state.step),
            delete_local_checkpoint_after_upload=False,  # PersistCheckpoint moves or removes the staged files
        )
        return time.perf_counter() - t0

    # -- sampling -------------------------------------------------------------------------------
    def write_grid(self) -> None:
        if self.rundir is None:
            return
        self._ema_model()
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            # The other ranks on this node wait in the next collective meanwhile: sampling may
            # use the CPUs Ray reserved for all of them.
            torch.set_num_threads(max(threads, int(self.plan.cpus_per_worker * self.local_world)))
        try:
            png = sample_grid(self._sample_model, self.cfg, device=self.device)
        finally:
            torch.set_num_threads(threads)
        self.rundir.write_bytes(f"samples/step_{self.state.step:07d}.png", png)
        if self.tracker is not None:
            self.tracker.image(self.state.step, png)

    def _ema_model(self) -> torch.nn.Module:
        """The denoiser holding the current EMA weights (built once), for grids and validation."""
        if self._sample_model is None:
            self._sample_model = build_denoiser(self.cfg, self.num_classes).to(self.device).eval()
        self.train.ema.copy_to(self._sample_model)
        return self._sample_model

    # -- the loop -------------------------------------------------------------------------------
    def _batches(self, reader, global_batch: int):
        """This rank's micro-batches for the rest of the current epoch, from the recorded data
        position (orchestrator/data/position.py: exact to the sample, on any world size)."""
        from orchestrator.train.faults import SampleRecorder

        recorder = SampleRecorder(self.rank)
        start = self.state.epoch_position(global_batch)
        for i, sb in enumerate(reader.batches(self.state.epoch, start, global_batch=global_batch, world=self.world,
                                              rank=self.rank, prefetch=self.cfg.data.prefetch_batches)):
            if recorder:
                recorder.record(epoch=self.state.epoch, step=self.state.step + 1, position=start + i * global_batch,
                                ids=reader.sample_names(sb.ids))
            yield {"image": torch.from_numpy(sb.image).to(self.device),
                   "label": torch.from_numpy(sb.label).to(self.device)}

    def _log(self, window: MetricsWindow, bar, val: dict[str, Any] | None = None) -> dict[str, Any]:
        rec = {**window.flush(self.train.engine, self.state, self.train.grad_norm), **(val or {})}
        if self.bad_counter:
            from orchestrator.data import bad_sample_counts

            rec["bad_samples"] = bad_sample_counts(self.bad_counter)
        rec["storage_retries"] = retry_counts.total
        rec["ema_decay"] = self.train.ema.last_decay
        if self.plan.precision == "fp16" and not self.plan.autocast:
            rec["overflow_skipped_steps"] = self.train.engine.skipped_steps  # DeepSpeed's count, cumulative
        if self.mfu is not None and self.mfu.peak:
            rec["mfu"] = self.mfu(rec["images_per_s"])
        if self.metrics_log is not None:
            self.metrics_log.write(rec)
        if self.tracker is not None:
            self.tracker.log(rec)
        if bar is not None:
            bar.logged(rec)
        return rec

    def _after_step(self, window: MetricsWindow, bar) -> bool:
        """Logging, validation, grids and checkpoints due at this step; True when training is done.
        Collectives (log flush, validation, report) happen on every rank at the same steps."""
        import ray.train

        cfg, s = self.cfg, self.state
        last = s.step == cfg.optim.steps
        ckpt_now = s.step % cfg.checkpoint.every_steps == 0 or last
        val = None
        if self.validator is not None and (s.step % cfg.logging.val_every_steps == 0 or last):
            val = self.validator.run(self._ema_model())  # collective, like the log flush
        # A log flush before every checkpoint: no checkpoint is written from diverged weights.
        if s.step % cfg.logging.every_steps == 0 or ckpt_now:
            window.flag(self.guard.weights_flag(self.train.params))
            rec = self._log(window, bar, val)
            reason = self.guard.reason(rec)
            if reason is not None:
                self._rollback(reason)
                return False
        elif val is not None and self.metrics_log is not None:
            self.metrics_log.write({"step": s.step, "samples_seen": s.samples_seen, **val, "time": time.time()})
            if self.tracker is not None:
                self.tracker.log({"step": s.step, **val})
        if s.step % cfg.sampling.every_steps == 0 or last:
            t_grid = time.perf_counter()
            self.write_grid()
            window.exclude(time.perf_counter() - t_grid)
        if self._first_step and self.rundir is not None:
            # With the driver's "started" event: the time to the first step.
            self.rundir.event({"event": "first_step", "step": s.step, "time": time.time()})
        self._first_step = False
        report = {"step": s.step, "samples_seen": s.samples_seen, "epoch": s.epoch, "loss": window.last_loss}
        if val is not None:
            report["val_loss"] = val["val_loss"]
        if ckpt_now:
            stall = self.save_and_report(report)
            window.exclude(stall)
            if self.rundir is not None:
                self.rundir.event({"event": "checkpoint", "step": s.step, "stall_s": round(stall, 3), "time": time.time()})
            if bar is not None:
                bar.checkpoint(s.step, f"{self.rundir.uri}/{checkpoint_dir_name(s.step)}", stall)
        elif val is not None:
            ray.train.report(report)  # a barrier like any report: every rank, same steps
        return last

    def _rollback(self, reason: str) -> None:
        """Reload the last good checkpoint; keep the data position (past the bad batches)."""
        import ray.train

        diverged_at = self.state.step
        self.guard.admit(reason, diverged_at)
        ckpt = ray.train.get_checkpoint()  # the newest persisted in this invocation
        if ckpt is not None:
            source = ckpt.path
            with ckpt.as_directory() as d:
                good = read_checkpoint(d, engine=self.train.engine, ema=self.train.ema)
        elif self.resume_from:
            source = self.resume_from
            good = read_checkpoint_uri(self.resume_from, self.cfg.storage.s3, engine=self.train.engine, ema=self.train.ema)
        else:
            raise DivergenceError(
                f"training diverged at step {diverged_at} ({reason}) before the first checkpoint. Fix: lower "
                "optim.lr or raise optim.warmup_steps (or checkpoint earlier with checkpoint.every_steps)"
            )
        self.state.step, self.state.samples_seen = good.step, good.samples_seen
        if self.metrics_log is not None:
            self.metrics_log.rewind(good.step)
        if self.tracker is not None:
            self.tracker.rewind(good.step)
        if self.rundir is not None:
            print(f"raydiff: {reason} at step {diverged_at}: rolled back to {source} (step {good.step}), "
                  f"skipping the batches in between ({self.guard.rollbacks}/{self.guard.max_rollbacks})", flush=True)
            self.rundir.event({"event": "rollback", "reason": reason, "from_step": diverged_at, "to_step": good.step,
                               "checkpoint": source, "time": time.time()})

    def fit(self) -> None:
        import ray.train

        cfg = self.cfg
        self.restore()
        if self.rundir is not None:
            self.rundir.event(phase_event("restore"))
            from orchestrator.config import config_to_dict
            from orchestrator.tracking import build_tracker
            from orchestrator.tracking.mfu import MfuMeter

            self.tracker = build_tracker(cfg, self.rundir.uri, resume_step=self.state.step,
                                         params=config_to_dict(cfg))
            self.mfu = MfuMeter(cfg, self.num_classes, device=self.device, precision=self.plan.precision,
                                world=self.world)
        reader = ray.get(self.reader_ref)
        global_batch = self.plan.micro_batch_size * self.world
        if reader.steps_per_epoch(global_batch) == 0:
            raise RuntimeError(
                f"the training data holds {reader.total} samples, fewer than one batch of optim.batch_size="
                f"{global_batch}. Fix: lower optim.batch_size, or check `raydiff data ls` on data.source")
        bar = None
        if self.rank == 0 and self.progress_mode != "off":
            from orchestrator.train.progress import Progress

            bar = Progress(self.progress_mode, name=cfg.run.name, total=cfg.optim.steps, start_step=self.state.step,
                           every_s=cfg.logging.progress_every_s)
        window = MetricsWindow(cfg.diffusion.loss_bins, self.train.objective.num_timesteps, self.device)
        self._first_step = True
        try:
            while self.state.step < cfg.optim.steps:
                t_wait = time.perf_counter()
                for batch in self._batches(reader, global_batch):
                    waited = time.perf_counter() - t_wait
                    batch = self.guard.poison(batch, self.state.step + 1)
                    out = self.train.step(batch, self.state.step)
                    s = self.state
                    s.step += 1
                    # Source samples, bad ones included: the position never shifts (data/reader.py).
                    s.samples_in_epoch = s.epoch_position(global_batch) + global_batch
                    s.batch_in_epoch += 1
                    s.samples_seen += global_batch
                    window.add(out, out.t.shape[0], waited)
                    if bar is not None:
                        bar.step(s.step)
                    done = self._after_step(window, bar)
                    exit_if_due(s.step)
                    if done:
                        break
                    t_wait = time.perf_counter()
                else:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = self.state.samples_in_epoch = 0
        finally:
            if self.metrics_log is not None:
                self.metrics_log.close()
            if self.tracker is not None:
                self.tracker.close()
            if bar is not None:
                bar.close()


def train_worker(args: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker=train_worker, ...)``)."""
    from orchestrator.logs import configure_worker, library_prints

    t_entry = time.time()  # the worker group is up: Ray Train runs this on every rank
    wa = WorkerArgs(**args)
    configure_worker(wa.verbose)
    with library_prints(wa.verbose):  # DeepSpeed print()s its JIT-built ops while the engine starts
        worker = Worker(validate_config(wa.config), Plan(**wa.plan), wa.num_classes, wa.bad_counter, wa.val_images,
                        wa.init_checkpoint, wa.resume_from, wa.class_names, wa.progress, wa.reader)
    if worker.rundir is not None:
        worker.rundir.event(phase_event("workers", t_entry))
        worker.rundir.event(phase_event("engine"))
    worker.fit()
