"""The EMA weights as a sampling model, for rank 0's sample grids and for validation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from model.ema import EMA
from orchestrator.builders import build_denoiser
from orchestrator.config import TrainConfig
from orchestrator.sampling import sample_grid

if TYPE_CHECKING:
    from orchestrator.text import TextConditioner


class EmaSampler:
    def __init__(self, cfg: TrainConfig, num_classes: int | None, ema: EMA, device: torch.device, *,
                 node_cpus: int, text: TextConditioner | None = None):
        self.cfg, self.num_classes, self.ema, self.device = cfg, num_classes, ema, device
        # Text models: the run's frozen encoder, which has the grid prompts (sampling.prompts) encoded.
        self.text = text
        # The CPUs Ray reserved for all the ranks on this node (sampling on CPU may use them).
        self.node_cpus = node_cpus
        self._model: torch.nn.Module | None = None

    def model(self) -> torch.nn.Module:
        """The denoiser holding the current EMA weights (built once)."""
        if self._model is None:
            self._model = build_denoiser(self.cfg.model, self.cfg.data, self.num_classes).to(self.device).eval()
        self.ema.copy_to(self._model)
        return self._model

    def grid_png(self) -> bytes:
        """A sample grid (PNG) from the current EMA weights."""
        model = self.model()
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            # The other ranks on this node wait in the next collective meanwhile: sampling may
            # use the CPUs Ray reserved for all of them.
            torch.set_num_threads(max(threads, self.node_cpus))
        try:
            return sample_grid(model, self.cfg, device=self.device, text=self.text)
        finally:
            torch.set_num_threads(threads)
