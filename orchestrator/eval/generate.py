"""Batched, seeded generation with a progress bar, for ``raydiff sample`` and ``raydiff eval``.

Batch ``i`` is sampled by ``orchestrator.sampling.generate`` with a CPU generator seeded
``seed + i`` (batch 0 with ``seed`` itself, so one batch reproduces the training grids exactly).
The images therefore depend on the seed, the settings and the batch size, not on the device.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from orchestrator.config import ConfigError, SamplingConfig, TrainConfig
from orchestrator.sampling import generate


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
        self.null_label = getattr(inner, "null_label", None)
        self.num_classes = getattr(inner, "num_classes", None)
        self.train(inner.training)  # sampling.generate restores this mode on the way out

    def forward(self, x, t, labels=None):
        out = self.inner(x, t, labels)
        self.bar.update(1)
        return out


def generate_batched(model: nn.Module, cfg: TrainConfig, labels: torch.Tensor | None, num: int, *, seed: int,
                     batch_size: int | None = None, device: torch.device | str = "cpu",
                     scfg: SamplingConfig | None = None, desc: str = "sampling",
                     progress: bool | None = None) -> torch.Tensor:
    """``num`` images in [-1, 1] (CPU, float32); ``labels`` is None (unconditional) or [num].
    ``progress`` None shows a tqdm bar only when stdout is a terminal."""
    from tqdm import tqdm

    scfg = scfg or cfg.sampling
    if labels is not None and labels.shape != (num,):
        raise ValueError(f"labels must have shape ({num},), got {tuple(labels.shape)}")
    bs = num if not batch_size else min(batch_size, num)
    starts = list(range(0, num, bs))
    steps = min(scfg.num_steps, cfg.diffusion.num_timesteps)
    show = sys.stdout.isatty() if progress is None else progress
    device = torch.device(device)
    model = model.to(device)
    out = []
    with tqdm(total=len(starts) * steps, desc=desc, unit="step", disable=not show, leave=False) as bar:
        counted = _Counted(model, bar)
        for i, s in enumerate(starts):
            n = min(bs, num - s)
            lab = None if labels is None else labels[s : s + n]
            out.append(generate(counted, cfg, lab, n, seed=seed + i, device=device, scfg=scfg))
    return torch.cat(out)
