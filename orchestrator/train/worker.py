"""The Ray Train worker: build from config, take the dataset shard, train, report.

Everything here runs inside a Ray Train worker process, where Ray has already set up
torch.distributed. This module is the loop; it delegates the step to ``TrainStep``
(train/step.py), checkpoints (restore, save, rollback) to ``TrainCheckpointer``
(train/checkpoint/), the metrics window to train/metrics.py, divergence checks to
train/divergence.py and rank 0's outputs (tracking, grids, progress) to train/outputs.py.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.train
import torch

from model.conditioning import class_conditioning
from orchestrator.config import validate_config
from orchestrator.data import bad_sample_counts
from orchestrator.logs import configure_worker, library_prints
from orchestrator.plan import Plan
from orchestrator.storage import LeaseLost, retry_counts
from orchestrator.train.checkpoint.layout import checkpoint_dir_name
from orchestrator.train.checkpoint.training import TrainCheckpointer
from orchestrator.train.divergence import DivergenceError, DivergenceGuard
from orchestrator.train.faults import SampleRecorder
from orchestrator.train.grids import EmaSampler
from orchestrator.train.metrics import MetricsWindow
from orchestrator.train.outputs import RankZeroOutputs
from orchestrator.train.startup import phase_event
from orchestrator.train.state import TrainState
from orchestrator.train.step import TrainStep
from orchestrator.train.validation import Validator

if TYPE_CHECKING:
    from orchestrator.train.launch import WorkerArgs  # launch.py imports this module in the worker

log = logging.getLogger("raydiff.train")


class Worker:
    def __init__(self, args: WorkerArgs):
        self.args = args
        self.cfg = cfg = validate_config(args.config)
        self.plan = plan = Plan(**args.plan)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if plan.device == "gpu":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
            # Ray sets OMP_NUM_THREADS to the worker's CPU share; torch's intra-op pool must
            # match or two workers on two cores fight over 4 threads.
            torch.set_num_threads(max(1, int(plan.cpus_per_worker)))
        self.train = TrainStep(cfg, plan, args.num_classes, device=self.device, rank=self.rank)
        self.guard = DivergenceGuard(cfg.run.max_rollbacks, cfg.precision.min_loss_scale,
                                     engine_fp16=plan.precision == "fp16" and not plan.autocast,
                                     nan_at_step=args.faults.nan_at_step)
        self.checkpointer = TrainCheckpointer(cfg, engine=self.train.engine, ema=self.train.ema, rank=self.rank,
                                              world=self.world, num_classes=args.num_classes,
                                              class_names=args.class_names, resume_from=args.resume_from,
                                              init_checkpoint=args.init_checkpoint, holder=args.lease_holder,
                                              write_delay_s=args.faults.write_delay_s)
        self.out = RankZeroOutputs(cfg, plan, rank=self.rank, world=self.world, num_classes=args.num_classes,
                                   device=self.device, progress=args.progress, holder=args.lease_holder)
        self.sampler = EmaSampler(cfg, args.num_classes, self.train.ema, self.device,
                                  node_cpus=int(plan.cpus_per_worker * ctx.get_local_world_size()), text=self.train.text)
        self.state = TrainState()
        self.validator = None
        if args.val_images is not None and cfg.logging.val_every_steps:
            held = ray.get(args.val_images)
            # Text models: the held-out loss of the unconditional branch (the empty prompt); the
            # held-out images' captions are not loaded with them.
            val_cond = (class_conditioning(held.get("label"), args.num_classes) if self.train.text is None
                        else self.train.text.null()[torch.zeros(len(held["image"]), dtype=torch.long)])
            self.validator = Validator(held["image"], val_cond,
                                       self.train.objective, timesteps=cfg.logging.val_timesteps, seed=cfg.data.seed,
                                       rank=self.rank, world=self.world, device=self.device,
                                       batch_size=plan.micro_batch_size)

    def _batches(self, reader, global_batch: int):
        """This rank's micro-batches for the rest of the current epoch, from the recorded data
        position (orchestrator/data/position.py: exact to the sample, on any world size)."""
        recorder = SampleRecorder(self.rank, self.args.faults.record_sample_ids_dir)
        start = self.state.epoch_position(global_batch)
        self.state.data_order = self.state.order_version(global_batch)  # saved with the position
        for i, sb in enumerate(reader.batches(self.state.epoch, start, global_batch=global_batch, world=self.world,
                                              rank=self.rank, prefetch=self.cfg.data.prefetch_batches,
                                              order_version=self.state.data_order)):
            if recorder:
                recorder.record(epoch=self.state.epoch, step=self.state.step + 1, position=start + i * global_batch,
                                ids=reader.sample_names(sb.ids))
            batch = {"image": torch.from_numpy(sb.image).to(self.device),
                     "label": torch.from_numpy(sb.label).to(self.device)}
            # Text-to-image data (issue 20): "text" stays a numpy array of str (the encoder
            # tokenizes it); precomputed "text_embedding"/"text_mask" go to the device.
            for k, v in sb.text_fields().items():
                batch[k] = v if k == "text" else torch.from_numpy(np.ascontiguousarray(v)).to(self.device)
            yield batch

    def _record(self, window: MetricsWindow, val: dict[str, Any] | None) -> dict[str, Any]:
        """The reduced metrics of the window (a collective: every rank, same steps)."""
        rec = {**window.flush(self.train.engine, self.state, self.train.grad_norm), **(val or {})}
        if self.args.bad_counter:
            rec["bad_samples"] = bad_sample_counts(self.args.bad_counter)
        rec["storage_retries"] = retry_counts.total
        rec["ema_decay"] = self.train.ema.last_decay
        if self.plan.precision == "fp16" and not self.plan.autocast:
            rec["overflow_skipped_steps"] = self.train.engine.skipped_steps  # DeepSpeed's count, cumulative
        self.out.log(rec)
        return rec

    def _after_step(self, window: MetricsWindow) -> bool:
        """Logging, validation, grids and checkpoints due at this step; True when training is done.
        Collectives (log flush, validation, report) happen on every rank at the same steps."""
        cfg, s = self.cfg, self.state
        last = s.step == cfg.optim.steps
        ckpt_now = s.step % cfg.checkpoint.every_steps == 0 or last
        val = None
        if self.validator is not None and (s.step % cfg.logging.val_every_steps == 0 or last):
            val = self.validator.run(self.sampler.model())  # collective, like the log flush
        # A log flush before every checkpoint: no checkpoint is written from diverged weights.
        if s.step % cfg.logging.every_steps == 0 or ckpt_now:
            window.flag(self.guard.weights_flag(self.train.params))
            reason = self.guard.reason(self._record(window, val))
            if reason is not None:
                self._rollback(reason)
                return False
        elif val is not None:
            self.out.log({"step": s.step, "samples_seen": s.samples_seen, **val, "time": time.time()})
        if self.out.active and (s.step % cfg.sampling.every_steps == 0 or last):
            t_grid = time.perf_counter()
            self.out.grid(s.step, self.sampler.grid_png())
            window.exclude(time.perf_counter() - t_grid)
        if self._first_step:
            # With the driver's "started" event: the time to the first step.
            self.out.event({"event": "first_step", "step": s.step, "time": time.time()})
            self._first_step = False
        report = {"step": s.step, "samples_seen": s.samples_seen, "epoch": s.epoch, "loss": window.last_loss}
        if val is not None:
            report["val_loss"] = val["val_loss"]
        if ckpt_now:
            self.out.flush()  # the history reaches storage with every checkpoint
            stall = self.checkpointer.save(s, report)
            window.exclude(stall)
            self.out.checkpoint(s.step, f"{self.checkpointer.rundir.uri}/{checkpoint_dir_name(s.step)}", stall)
        elif val is not None:
            ray.train.report(report)  # a barrier like any report: every rank, same steps
        return last

    def _rollback(self, reason: str) -> None:
        """Reload the last good checkpoint; keep the data position (past the bad batches)."""
        diverged_at = self.state.step
        self.guard.admit(reason, diverged_at)
        restored = self.checkpointer.rollback(self.state)
        if restored is None:
            raise DivergenceError(
                f"training diverged at step {diverged_at} ({reason}) before the first checkpoint. Fix: lower "
                "optim.lr or raise optim.warmup_steps (or checkpoint earlier with checkpoint.every_steps)"
            )
        self.state = restored.state
        self.out.rollback(reason, diverged_at, self.state.step, restored.source,
                          f"{self.guard.rollbacks}/{self.guard.max_rollbacks}")

    def fit(self) -> None:
        cfg = self.cfg
        self.state = self.checkpointer.restore().state
        self.out.event(phase_event("restore"))
        self.out.start(self.state.step)
        reader = ray.get(self.args.reader)
        global_batch = self.plan.micro_batch_size * self.world
        if reader.steps_per_epoch(global_batch) == 0:
            raise RuntimeError(
                f"the training data holds {reader.total} samples, fewer than one batch of optim.batch_size="
                f"{global_batch}. Fix: lower optim.batch_size, or check `raydiff data ls` on data.source")
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
                    self.out.step(s.step)
                    done = self._after_step(window)
                    self.args.faults.exit_if_due(s.step)
                    if done:
                        break
                    t_wait = time.perf_counter()
                else:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = self.state.samples_in_epoch = 0
                    self.state.data_order = None  # the next epoch takes the current order
        finally:
            self.out.close()


def run_worker(wa: WorkerArgs, t_entry: float) -> None:
    """One rank's whole run; ``t_entry``: when Ray Train called the entry point (train/launch.py)."""
    configure_worker(wa.verbose)
    with library_prints(wa.verbose):  # DeepSpeed print()s its JIT-built ops while the engine starts
        worker = Worker(wa)
    worker.out.event(phase_event("workers", t_entry))
    worker.out.event(phase_event("engine"))
    try:
        worker.fit()
    except LeaseLost:
        # The run's lease was taken over (storage/fence.py): this worker wrote nothing after that
        # and stops here, quietly; its driver exits with LEASE_LOST_EXIT and one line (a raised
        # error would print Ray's traceback of the training function, and be retried).
        return
