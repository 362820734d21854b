"""Batched, seeded generation with a progress bar, for ``raydiff sample`` and ``raydiff eval``.

Batch ``i`` is sampled by ``orchestrator.sampling.generate`` with a CPU generator seeded
``seed + i`` (batch 0 with ``seed`` itself, so one batch reproduces the training grids exactly).
The images therefore depend on the seed, the settings and the batch size, not on the device.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from model.conditioning import Conditioning
from orchestrator.config import ConfigError, SamplingConfig, TrainConfig
from orchestrator.sampling import at_precision, generate, sample_dtype


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is visible here. Fix: --device cpu (or auto)")
    return torch.device(name)


class _Counted(nn.Module):
    """Forwards to the denoiser and ticks the bar once per network call: the samplers call the
    network once per step (one 2B batch under guidance), so the bar counts sampler steps."""

    def __init__(self, inner: nn.Module, bar):
        super().__init__()
        self.inner = inner
        self.bar = bar
        self.train(inner.training)  # sampling.generate restores this mode on the way out

    def forward(self, x, t, cond: Conditioning | None = None):
        out = self.inner(x, t, cond)
        self.bar.update(1)
        return out


def generate_batched(model: nn.Module, cfg: TrainConfig, cond: Conditioning | None, num: int, *, seed: int,
                     batch_size: int | None = None, device: torch.device | str = "cpu",
                     scfg: SamplingConfig | None = None, desc: str = "sampling",
                     progress: bool | None = None) -> torch.Tensor:
    """``num`` images in [-1, 1] (CPU, float32); ``cond`` is None (unconditional) or has ``num``
    entries; the network runs in ``sampling.precision``. ``progress`` None shows a tqdm bar only
    when stdout is a terminal."""
    from tqdm import tqdm

    scfg = scfg or cfg.sampling
    if cond is not None and cond.batch_size != num:
        raise ValueError(f"conditioning for {cond.batch_size} samples given for {num} images")
    bs = num if not batch_size else min(batch_size, num)
    starts = list(range(0, num, bs))
    steps = min(scfg.num_steps, cfg.diffusion.num_timesteps)
    show = sys.stdout.isatty() if progress is None else progress
    device = torch.device(device)
    # One copy at the sampling precision for every batch (generate() would make one per call).
    model = at_precision(model.to(device), sample_dtype(scfg.precision, device))
    out = []
    with tqdm(total=len(starts) * steps, desc=desc, unit="step", disable=not show, leave=False) as bar:
        counted = _Counted(model, bar)
        for i, s in enumerate(starts):
            n = min(bs, num - s)
            part = None if cond is None else cond[s : s + n]
            out.append(generate(counted, cfg, part, n, seed=seed + i, device=device, scfg=scfg, cast=False))
    return torch.cat(out)
