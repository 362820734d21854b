"""The Ray Train worker: build from config, take the dataset shard, train, report, resume.

Everything here runs inside a Ray Train worker process, where Ray has already set up
torch.distributed. The state that defines "where training is" is explicit (`TrainState`):
step, samples seen and the data position (epoch and batches consumed within it), saved with
every checkpoint together with the DeepSpeed shards, the EMA weights and the resolved config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.ema import EMA
from model.objectives import DiffusionObjective, loss_per_timestep_bin
from model.registry import build_model
from orchestrator.config import TrainConfig, config_to_yaml, validate_config
from orchestrator.engine import build_engine, loss_scale_of
from orchestrator.plan import Plan
from orchestrator.rundir import RunDir
from orchestrator.sampling import sample_grid, schedule_from_config

log = logging.getLogger("raydiff.train")

DS_TAG = "ds"
STATE_FILE = "train_state.json"
EMA_FILE = "ema.pt"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.json"


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    epoch: int = 0
    # Batches of the current epoch already trained on: after a resume the epoch is re-read and
    # this many batches are skipped (Ray Data has no mid-epoch iterator resume).
    batch_in_epoch: int = 0


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands each worker (plain data: it crosses process boundaries)."""

    config: dict[str, Any]  # with secrets revealed: in memory only, never written
    plan: dict[str, Any]
    num_classes: int | None
    bad_counter: str | None


def build_denoiser(cfg: TrainConfig, num_classes: int | None) -> torch.nn.Module:
    """The registry model that ``cfg`` describes (trainer, sample grids and checkpoint loading)."""
    return build_model(cfg.model.name, in_channels=cfg.data.channels, image_size=cfg.data.resolution,
                       num_classes=num_classes)


def _set_threads(plan: Plan) -> None:
    # Ray sets OMP_NUM_THREADS to the worker's CPU share; torch's intra-op pool must match or
    # two workers on two cores fight over 4 threads.
    n = max(1, int(plan.cpus_per_worker))
    torch.set_num_threads(n)


def _quiet_deepspeed() -> None:
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Trainer:
    def __init__(self, cfg: TrainConfig, plan: Plan, num_classes: int | None, bad_counter: str | None):
        import ray.train

        self.cfg, self.plan = cfg, plan
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.local_world = ctx.get_local_world_size()
        self.bad_counter = bad_counter
        if plan.device == "gpu":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
            _set_threads(plan)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[plan.precision]

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.num_classes = num_classes
        module = build_denoiser(cfg, num_classes)
        self.engine = build_engine(cfg, plan, module)
        if cfg.precision.compile:
            self.engine.compile()
        with self._gathered():
            self.ema = EMA(self.engine.module, decay=cfg.optim.ema_decay, warmup=cfg.optim.ema_warmup)
        self.schedule = schedule_from_config(cfg)
        d = cfg.diffusion
        self.objective = DiffusionObjective(
            self.schedule,
            d.prediction,
            d.weighting,
            min_snr_gamma=d.min_snr_gamma,
            p2_gamma=d.p2_gamma,
            p2_k=d.p2_k,
            num_classes=num_classes,
            label_dropout=d.label_dropout,
        )
        self.state = TrainState()
        self.rundir = RunDir.for_config(cfg) if self.rank == 0 else None
        self._sample_model: torch.nn.Module | None = None

    # -- helpers ------------------------------------------------------------------------------
    def _gathered(self):
        """Full parameters on every rank under ZeRO-3 (partitioned otherwise); no-op below 3."""
        if self.plan.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def _forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        # DeepSpeed's bf16/fp16 engines keep module weights in half precision; inputs must match.
        return self.engine(x.to(self.dtype), t, labels)

    def _step_generator(self) -> torch.Generator:
        # Seeded by (seed, rank, step): the random draws of a step are the same after a resume,
        # without saving generator state.
        g = torch.Generator(device=self.device if self.device.type == "cuda" else "cpu")
        g.manual_seed(((self.cfg.seed * 1_000_003 + self.rank) * 1_000_003 + self.state.step) % (2**63))
        return g

    def _flip(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if not self.cfg.data.random_flip:
            return images
        from model._random import rand

        mask = rand((images.shape[0],), generator=g, device=images.device) < 0.5
        return torch.where(mask[:, None, None, None], images.flip(-1), images)

    # -- checkpoints ----------------------------------------------------------------------------
    def restore(self) -> bool:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return False
        with ckpt.as_directory() as d:
            path, _ = self.engine.load_checkpoint(d, tag=DS_TAG)
            if path is None:
                raise RuntimeError(f"checkpoint {ckpt.path} has no DeepSpeed state under tag {DS_TAG!r}")
            self.ema.load_state_dict(torch.load(Path(d) / EMA_FILE, map_location="cpu", weights_only=False))
            self.state = TrainState(**json.loads((Path(d) / STATE_FILE).read_text()))
        if self.rank == 0:
            print(f"raydiff: resumed from {ckpt.path} at step {self.state.step} "
                  f"(epoch {self.state.epoch}, batch {self.state.batch_in_epoch})", flush=True)
            # Durable record too: console lines from workers can be lost when a driver dies.
            assert self.rundir is not None
            self.rundir.append_text("events.jsonl", json.dumps(
                {"event": "resumed", "checkpoint": ckpt.path, "time": time.time(), **asdict(self.state)}) + "\n")
        return True

    def save_and_report(self, metrics: dict[str, Any]) -> None:
        import ray.train
        from ray.train import Checkpoint

        tmp = tempfile.mkdtemp(prefix=f"raydiff-ckpt-r{self.rank}-")
        try:
            # All ranks save (ZeRO shards are per rank); Ray merges the rank directories.
            self.engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"train_state": asdict(self.state)})
            if self.rank == 0:
                torch.save(self.ema.state_dict(), Path(tmp) / EMA_FILE)
                (Path(tmp) / STATE_FILE).write_text(json.dumps(asdict(self.state)))
                (Path(tmp) / CONFIG_FILE).write_text(config_to_yaml(self.cfg))
                (Path(tmp) / MODEL_FILE).write_text(json.dumps({"num_classes": self.num_classes}))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- sampling -------------------------------------------------------------------------------
    def write_grid(self) -> None:
        if self.rank != 0:
            return
        if self._sample_model is None:
            self._sample_model = build_denoiser(self.cfg, self.num_classes).to(self.device)
        self.ema.copy_to(self._sample_model)
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            # The other ranks on this node wait in the next collective meanwhile: sampling may
            # use the CPUs Ray reserved for all of them.
            torch.set_num_threads(max(threads, int(self.plan.cpus_per_worker * self.local_world)))
        try:
            png = sample_grid(self._sample_model, self.cfg, device=self.device)
        finally:
            torch.set_num_threads(threads)
        assert self.rundir is not None
        self.rundir.write_bytes(f"samples/step_{self.state.step:07d}.png", png)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> None:
        import ray.train

        cfg, plan = self.cfg, self.plan
        self.restore()
        shard = ray.train.get_dataset_shard("train")
        bar = None
        if self.rank == 0 and cfg.logging.progress:
            from ray.experimental.tqdm_ray import tqdm

            bar = tqdm(total=cfg.optim.steps, desc=f"train {cfg.run.name}")
            bar.update(self.state.step)  # tqdm_ray has no `initial`
        window = _Window(cfg.diffusion.loss_bins, self.device)
        t_last = time.perf_counter()
        while self.state.step < cfg.optim.steps:
            batches = 0
            it = shard.iter_torch_batches(
                batch_size=plan.micro_batch_size,
                drop_last=True,
                prefetch_batches=cfg.data.prefetch_batches,
                local_shuffle_buffer_size=cfg.data.local_shuffle_buffer or None,
                local_shuffle_seed=(cfg.data.seed * 7919 + self.state.epoch) * 131 + self.rank
                if cfg.data.local_shuffle_buffer
                else None,
                dtypes={"image": torch.float32, "label": torch.int64},
                device=self.device,
            )
            for batch in it:
                batches += 1
                if batches <= self.state.batch_in_epoch:
                    continue  # fast-forward to the recorded data position after a resume
                self._train_step(batch, window)
                if bar is not None:
                    bar.update(1)
                step = self.state.step
                if step % cfg.logging.every_steps == 0 or step == cfg.optim.steps:
                    now = time.perf_counter()
                    rec = window.flush(self, now - t_last)
                    t_last = now
                    if bar is not None:
                        # tqdm_ray has no postfix: loss and images/s go in the description.
                        bar.set_description(
                            f"train {cfg.run.name} loss {rec['loss']:.4f} {rec['images_per_s']:.0f} img/s"
                        )
                if self.rank == 0 and (step % cfg.sampling.every_steps == 0 or step == cfg.optim.steps):
                    self.write_grid()
                if step % cfg.checkpoint.every_steps == 0 or step == cfg.optim.steps:
                    self.save_and_report({"step": step, "samples_seen": self.state.samples_seen,
                                          "epoch": self.state.epoch, "loss": window.last_loss})
                if step >= cfg.optim.steps:
                    break
            else:
                if batches == 0:
                    raise RuntimeError(
                        f"the training dataset gave no full batch of {plan.micro_batch_size} per worker: "
                        "it is empty after skipping bad samples, or smaller than optim.batch_size. "
                        "Fix: check `raydiff data verify` on data.source, or lower optim.batch_size"
                    )
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
        if bar is not None:
            bar.close()

    def _train_step(self, batch: dict[str, torch.Tensor], window: "_Window") -> None:
        g = self._step_generator()
        x0 = self._flip(batch["image"], g)
        labels = batch["label"] if self.num_classes is not None else None
        out = self.objective.training_losses(self._forward, x0, labels, generator=g)
        self.engine.backward(out.loss)
        self.engine.step()
        with self._gathered():
            self.ema.update(self.engine.module)
        self.state.step += 1
        self.state.batch_in_epoch += 1
        self.state.samples_seen += x0.shape[0] * self.world
        window.add(out, x0.shape[0], self.objective.num_timesteps)


class _Window:
    """Accumulates loss statistics between log steps and reduces them across ranks."""

    def __init__(self, bins: int, device: torch.device):
        self.bins, self.device = bins, device
        self.last_loss = float("nan")
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.bin_sums = torch.zeros(self.bins, device=self.device)
        self.bin_counts = torch.zeros(self.bins, device=self.device)
        self.samples = 0
        self.steps = 0

    def add(self, out, batch: int, num_timesteps: int) -> None:
        self.loss_sum += out.per_sample.float().sum()
        s, c = loss_per_timestep_bin(out.t, out.per_sample, num_timesteps, self.bins)
        self.bin_sums += s
        self.bin_counts += c
        self.samples += batch
        self.steps += 1

    def flush(self, trainer: Trainer, seconds: float) -> dict[str, Any]:
        """Collective: every rank calls it at the same steps. Rank 0 appends to metrics.jsonl."""
        buf = torch.cat([self.loss_sum.view(1), self.bin_sums, self.bin_counts,
                         torch.tensor([float(self.samples)], device=self.device)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(buf)
        total = float(buf[-1])
        loss = float(buf[0]) / max(total, 1.0)
        sums, counts = buf[1 : 1 + self.bins], buf[1 + self.bins : 1 + 2 * self.bins]
        per_bin = [float(s / c) if c > 0 else None for s, c in zip(sums.tolist(), counts.tolist())]
        eng = trainer.engine
        grad_norm = eng.get_global_grad_norm()
        rec = {
            "step": trainer.state.step,
            "samples_seen": trainer.state.samples_seen,
            "epoch": trainer.state.epoch,
            "loss": loss,
            "loss_per_t_bin": per_bin,
            "images_per_s": total / max(seconds, 1e-9),
            "lr": float(eng.get_lr()[0]),
            "loss_scale": loss_scale_of(eng),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "time": time.time(),
        }
        if trainer.bad_counter:
            from orchestrator.data import bad_sample_counts

            rec["bad_samples"] = bad_sample_counts(trainer.bad_counter)
        self.last_loss = loss
        if trainer.rank == 0 and trainer.rundir is not None:
            trainer.rundir.append_text("metrics.jsonl", json.dumps(rec) + "\n")
        self._reset()
        return rec


def train_worker(args: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker=train_worker, ...)``)."""
    _quiet_deepspeed()
    wa = WorkerArgs(**args)
    cfg = validate_config(wa.config)
    plan = Plan(**wa.plan)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    Trainer(cfg, plan, wa.num_classes, wa.bad_counter).fit()
