"""What ``raydiff bench step`` measures, shared by its in-process variants (bench/step.py) and
the Ray Train one (bench/step_ray.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Result:
    variant: str
    images_per_s: float
    first_step_s: float
    peak_mem_gib: float | None
    steps: int
    batch: int
    note: str = ""


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: a timer read after it measures the work, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
