"""Divergence: notice non-finite training and roll back to the last good checkpoint.

A NaN/inf loss or NaN weights (or, with DeepSpeed's fp16 engine, a loss scale that collapsed
to its minimum) is checked once per log interval and before every checkpoint — device-side
flags reduced with the metrics, never a host read per step — so a checkpoint is never written
from diverged weights. On divergence every rank reloads the last good checkpoint and keeps its
data position, which moves training past the offending batches (the recipe of large-scale
runs, e.g. PaLM, Chowdhery et al. 2022, sec. 5.1: restart from a checkpoint ~100 steps earlier
and skip the batches around the spike). After ``run.max_rollbacks`` rollbacks the run stops
with the reason.

``RAYDIFF_FAULT_NAN_AT_STEP=N`` (read by the driver into ``FaultHooks.nan_at_step``,
train/faults.py) poisons the batch of step N once per process, to test all of this on a real run.
"""

from __future__ import annotations

from typing import Any

import torch

class DivergenceError(RuntimeError):
    """Training diverged more often than run.max_rollbacks allows."""


class DivergenceGuard:
    def __init__(self, max_rollbacks: int, min_loss_scale: float, engine_fp16: bool, nan_at_step: int | None = None):
        self.max_rollbacks = max_rollbacks
        self.min_loss_scale = min_loss_scale
        self.engine_fp16 = engine_fp16  # DeepSpeed's fp16 engine: its loss scale can collapse
        self.rollbacks = 0
        self._inject_at = nan_at_step  # the test hook (FaultHooks.nan_at_step)

    def poison(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """The fault injection: NaN images for the step ``nan_at_step`` names."""
        if self._inject_at is None or step != self._inject_at:
            return batch
        self._inject_at = None  # once per process, so that the rollback can get past it
        return {**batch, "image": batch["image"] * float("nan")}

    @staticmethod
    def weights_flag(params: list[torch.Tensor]) -> torch.Tensor:
        """1.0 on the device when any weight is NaN/inf (one foreach reduction, no host read)."""
        norms = torch._foreach_norm([p.detach() for p in params])
        return (~torch.isfinite(torch.stack([n.float() for n in norms]))).any().float()

    def reason(self, rec: dict[str, Any]) -> str | None:
        if rec.get("nonfinite", 0) > 0:
            return "NaN/inf loss or weights"
        if self.engine_fp16 and rec.get("loss_scale", float("inf")) <= self.min_loss_scale:
            return f"the fp16 loss scale collapsed to precision.min_loss_scale={self.min_loss_scale:g}"
        return None

    def admit(self, reason: str, step: int) -> None:
        """Count a rollback; raise when there have been too many."""
        if self.rollbacks >= self.max_rollbacks:
            raise DivergenceError(
                f"training diverged at step {step} ({reason}) after {self.rollbacks} rollbacks "
                f"(run.max_rollbacks={self.max_rollbacks}). Fix: lower optim.lr, raise optim.warmup_steps, "
                "lower optim.grad_clip, or use precision.dtype=bf16"
            )
        self.rollbacks += 1
