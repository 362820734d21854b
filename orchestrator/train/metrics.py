"""Training metrics: accumulated on the device between log steps, reduced across ranks once per
log interval, written by rank 0 to ``metrics.jsonl`` (buffered on object storage).

Per step only device-side additions happen; the host reads values once per interval, in
``MetricsWindow.flush``, which every rank calls at the same steps (it is a collective).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from model.objectives import LossOutput, loss_per_timestep_bin
from orchestrator.train.engine import loss_scale_of
from orchestrator.train.state import TrainState


class MetricsWindow:
    """Loss statistics and timings of the steps since the last flush."""

    def __init__(self, bins: int, num_timesteps: int, device: torch.device):
        self.bins, self.num_timesteps, self.device = bins, num_timesteps, device
        self.last_loss = float("nan")
        self._start = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.bin_sums = torch.zeros(self.bins, device=self.device)
        self.bin_counts = torch.zeros(self.bins, device=self.device)
        self.samples = 0
        self.data_wait_s = 0.0
        self.excluded_s = 0.0
        self.nonfinite = torch.zeros((), device=self.device)

    def add(self, out: LossOutput, batch: int, data_wait_s: float) -> None:
        self.loss_sum += out.per_sample.float().sum()
        self.nonfinite += (~torch.isfinite(out.loss.detach())).float()
        s, c = loss_per_timestep_bin(out.t, out.per_sample, self.num_timesteps, self.bins)
        self.bin_sums += s
        self.bin_counts += c
        self.samples += batch
        self.data_wait_s += data_wait_s

    def flag(self, nonfinite: torch.Tensor) -> None:
        """Add a device-side count of non-finite things (weights) to the window."""
        self.nonfinite += nonfinite

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training steps (sample grids, checkpoint writes) out of the
        window's rates, so images/s measures the step and the data path."""
        self.excluded_s += seconds

    def flush(self, engine: Any, state: TrainState, grad_norm: torch.Tensor | None = None) -> dict[str, Any]:
        """Collective: every rank calls it at the same steps; returns the same record on each."""
        now = time.perf_counter()
        seconds, self._start = max(now - self._start - self.excluded_s, 1e-9), now
        buf = torch.cat([self.loss_sum.view(1), self.bin_sums, self.bin_counts, self.nonfinite.view(1),
                         torch.tensor([float(self.samples), self.data_wait_s], device=self.device)])
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(buf)
            world = dist.get_world_size()
        values = buf.tolist()  # the one host read of the interval
        total = values[-2]
        loss = values[0] / max(total, 1.0)
        sums, counts = values[1 : 1 + self.bins], values[1 + self.bins : 1 + 2 * self.bins]
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        rec = {
            "step": state.step,
            "samples_seen": state.samples_seen,
            "epoch": state.epoch,
            "loss": loss,
            # Non-finite losses and weights seen by all ranks in the window (train/divergence.py).
            "nonfinite": int(values[-3]),
            "loss_per_t_bin": [s / c if c > 0 else None for s, c in zip(sums, counts)],
            "images_per_s": total / seconds,
            # Share of wall time the workers spent waiting for their next batch (mean over ranks).
            "data_wait_share": min(1.0, values[-1] / world / seconds),
            "lr": float(engine.get_lr()[0]),
            "loss_scale": loss_scale_of(engine),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "time": time.time(),
        }
        self.last_loss = loss
        self._reset()
        return rec
