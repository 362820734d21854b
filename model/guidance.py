"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the model.

The samplers call ``model(x, t)``; :class:`CFGDenoiser` is such a model, built from the network
and the conditioning, in the style of k-diffusion's ``CFGDenoiser``. Samplers therefore never see
labels, text or guidance scales.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .conditioning import Conditioning

# A network as the objective and this wrapper call it: (x_t, t [B], conditioning or None) -> output.
Network = Callable[[Tensor, Tensor, "Conditioning | None"], Tensor]


class CFGDenoiser:
    """``forward(x, t)`` = out_uncond + w (out_cond - out_uncond)  (Ho & Salimans 2022, eq. 6,
    written with w = 1 + their w so that w = 1 is the plain conditional model and w = 0 the
    unconditional one, the convention of DiT / diffusers' ``guidance_scale``).

    The conditional and unconditional halves run as ONE forward pass on a 2B batch: this
    halves the number of kernel launches and keeps both halves under identical numerics.
    Guidance is applied to the raw model output; for eps/v prediction it is a linear
    combination of scores, for x0 prediction a linear combination of denoised images --
    both are affine-equivalent for a fixed (x_t, t).

    ``w = 1`` runs the conditional model alone (the unconditional half would cancel). ``cond``
    None (an unconditional model) has nothing to guide towards, so ``guidance_scale`` is ignored
    and the network runs once: one sampling config (e.g. guidance 2) serves both kinds of runs.
    """

    def __init__(self, model: Network, cond: Conditioning | None, guidance_scale: float = 1.0) -> None:
        self.model = model
        self.cond = cond
        self.guidance_scale = float(guidance_scale)
        # Built once: the 2B conditioning (cond, then null) of every guided step.
        self._both = cond.cat(cond.null_like()) if cond is not None and self.guidance_scale != 1.0 else None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.cond is not None and self.cond.batch_size != x.shape[0]:
            raise ValueError(f"conditioning for {self.cond.batch_size} samples given with a batch of {x.shape[0]}")
        if self._both is None:
            return self.model(x, t, None if self.cond is None else self.cond.to(x.device))
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.model(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), self._both.to(x.device))
        cond, uncond = out.chunk(2, dim=0)
        return uncond + self.guidance_scale * (cond - uncond)
