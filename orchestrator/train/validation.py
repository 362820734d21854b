"""The validation loss: one low-variance number per evaluation that ranks runs early.

Held-out images (``data.val_images``, left out of training by the data pipeline), at fixed
timesteps evenly spaced over [0, T) (``logging.val_timesteps`` per image), with fixed noise per
image (seeded by ``data.seed`` and the image's index, so it is the same in every run on the same
data, whatever the number of workers), through the EMA weights.

The number is the unweighted eps-space MSE: the network's output (eps, v or x0) is converted to
its eps estimate first. Unlike the training loss it does not depend on ``diffusion.weighting``,
``min_snr_gamma``, the P2 settings or ``diffusion.prediction``, so a sweep over those compares
like with like instead of ranking runs by the scale of their weighting. Noise schedules differ
in the noise level at a given t, so runs with different ``diffusion.schedule`` are compared by
the same t, not the same noise level: the final sample-quality score is the check there.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from model.conditioning import Conditioning
from model.objectives import DiffusionObjective

Denoiser = Callable[[torch.Tensor, torch.Tensor, "Conditioning | None"], torch.Tensor]


def validation_timesteps(num_timesteps: int, count: int) -> np.ndarray:
    """``count`` timesteps at the midpoints of equal slices of [0, T): no duplicate for
    count <= T, neither end (t = 0 is noise-free, t = T-1 nearly pure noise) over-weighted."""
    count = min(count, num_timesteps)
    return ((2 * np.arange(count) + 1) * num_timesteps) // (2 * count)


def image_noise(seed: int, index: int, count: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The fixed noise of held-out image ``index``: ``[count, *shape]``, from a CPU generator
    seeded by (seed, index) so that it does not depend on the device or the rank."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
    return torch.randn((count, *shape), generator=g)


class Validator:
    """This rank's share (images ``rank::world``) of the held-out set, with its noise, on the
    device. ``run`` is a collective: every rank calls it at the same steps."""

    def __init__(self, images: np.ndarray, cond: Conditioning | None, objective: DiffusionObjective, *,
                 timesteps: int, seed: int, rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
                 batch_size: int = 64):
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"images must be a non-empty [N, C, H, W] array, got shape {images.shape}")
        self.objective, self.device, self.batch_size = objective, torch.device(device), max(1, batch_size)
        self.num_images = len(images)
        mine = np.arange(rank, self.num_images, world)
        self.t_values = torch.as_tensor(validation_timesteps(objective.num_timesteps, timesteps), dtype=torch.long)
        k = len(self.t_values)
        self.x0 = torch.from_numpy(np.ascontiguousarray(images[mine])).to(self.device)
        self.cond = cond[torch.from_numpy(mine)].to(self.device) if cond is not None else None
        shape = tuple(images.shape[1:])
        noise = [image_noise(seed, int(i), k, shape) for i in mine]
        self.noise = (torch.stack(noise) if noise else torch.zeros((0, k, *shape))).to(self.device)

    @torch.no_grad()
    def partial(self, model: Denoiser) -> torch.Tensor:
        """``[sums per timestep, counts per timestep]`` over this rank's images (not reduced)."""
        k = len(self.t_values)
        sums = torch.zeros(k, device=self.device)
        counts = torch.zeros(k, device=self.device)
        pairs = len(self.x0) * k
        t_all = self.t_values.to(self.device)
        for start in range(0, pairs, self.batch_size):
            p = torch.arange(start, min(start + self.batch_size, pairs), device=self.device)
            img, tk = p // k, p % k
            x0, t, noise = self.x0[img], t_all[tk], self.noise[img, tk]
            x_t = self.objective.q_sample(x0, t, noise)
            out = model(x_t, t, self.cond[img] if self.cond is not None else None)
            _, eps = self.objective.predict_x0_eps(out.float(), x_t.float(), t)
            mse = ((eps.float() - noise.float()) ** 2).flatten(1).mean(dim=1)
            sums.index_add_(0, tk, mse)
            counts.index_add_(0, tk, torch.ones_like(mse))
        return torch.cat([sums, counts])

    def run(self, model: Denoiser) -> dict[str, Any]:
        """``val_loss`` (mean over all held-out images and timesteps) and ``val_loss_per_t``."""
        buf = self.partial(model)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(buf)
        values = buf.tolist()
        k = len(self.t_values)
        sums, counts = values[:k], values[k:]
        return {
            "val_loss": sum(sums) / max(sum(counts), 1.0),
            "val_loss_per_t": [s / c if c else None for s, c in zip(sums, counts)],
            "val_timesteps": self.t_values.tolist(),
        }
