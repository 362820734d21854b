"""Objects built from config sections, shared by training, sampling, evaluation and benchmarks."""

from __future__ import annotations

import torch

from model.registry import build_model
from orchestrator.config import TrainConfig


def build_denoiser(cfg: TrainConfig, num_classes: int | None) -> torch.nn.Module:
    """The registry model that ``cfg`` describes (trainer, sample grids and checkpoint loading)."""
    return build_model(cfg.model.name, in_channels=cfg.data.channels, image_size=cfg.data.resolution,
                       num_classes=num_classes)
