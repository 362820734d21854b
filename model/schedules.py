"""Noise schedules for discrete-time Gaussian diffusion.

Conventions (shared by every module in ``model/``):

* ``betas[i]`` is the variance of the forward step producing ``x_i`` from ``x_{i-1}``
  for integer indices ``i = 0 .. T-1`` (diffusers / DiT convention; the paper's
  ``t = 1..T`` is our ``i = t - 1``).
* ``alphas_cumprod[i] = prod_{j<=i} (1 - betas[j])`` is ᾱ and the forward marginal is
  ``q(x_i | x_0) = N(sqrt(ᾱ_i) x_0, (1 - ᾱ_i) I)`` (Ho et al. 2020, eq. 4).
* All schedule arithmetic is float64: ᾱ is a product of up to thousands of factors
  close to 1, and the samplers divide by sqrt(ᾱ) (~1e-2 at the end of the linear
  schedule), so float32 rounding would be amplified. Values are cast to the sample
  dtype only at the point of use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._checks import check_range
from .choices import SCHEDULE_KINDS, ScheduleKind  # torch-free: the config schema reads them



def _check_num_timesteps(num_timesteps: int) -> None:
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linearly spaced betas from ``beta_start`` to ``beta_end`` (Ho et al. 2020, Sec. 4:
    "forward process variances ... increasing linearly from β1 = 1e-4 to βT = 0.02")."""
    _check_num_timesteps(num_timesteps)
    if not (0.0 < beta_start <= beta_end < 1.0):
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(u: Tensor, s: float = 0.008) -> Tensor:
    """Un-normalised f(u) = cos²(((u + s) / (1 + s)) · π/2) with u = t/T in [0, 1]
    (Nichol & Dhariwal 2021, eq. 17); ᾱ_t = f(t/T) / f(0)."""
    return torch.cos((u + s) / (1.0 + s) * (math.pi / 2.0)) ** 2


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): β_t = 1 - ᾱ_t / ᾱ_{t-1}
    with ᾱ_t = f(t)/f(0), clipped to ``max_beta`` = 0.999 "to prevent singularities at the
    end of the diffusion process near t = T" (ibid., Sec. 3.2).

    Index ``i`` holds the paper's β_{i+1}, so that without clipping
    ``alphas_cumprod[i] == f((i+1)/T) / f(0)``. This is also what diffusers'
    ``beta_schedule="squaredcos_cap_v2"`` produces (for s = 0.008)."""
    _check_num_timesteps(num_timesteps)
    if s < 0:
        raise ValueError(f"cosine offset s must be >= 0, got {s}")
    if not (0.0 < max_beta <= 1.0):
        raise ValueError(f"max_beta must be in (0, 1], got {max_beta}")
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = cosine_alpha_bar(steps, s)
    betas = 1.0 - f[1:] / f[:-1]
    return betas.clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that the final step has SNR exactly 0 (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1).

    sqrt(ᾱ) is shifted so its last value is 0 and scaled so its first value is unchanged;
    betas are then recovered from the ratio of consecutive ᾱ. The last beta becomes 1.
    Models trained with it should use v-prediction (ibid., Sec. 3.2): with ᾱ_T = 0 an
    eps-prediction carries no information about x_0 at t = T."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() < 2:
        raise ValueError(f"betas must be a 1-D tensor with >= 2 entries, got shape {tuple(betas.shape)}")
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0 = alphas_bar_sqrt[0].clone()
    a_last = alphas_bar_sqrt[-1].clone()
    if not a0 > a_last:
        raise ValueError("cannot rescale a schedule whose ᾱ does not decrease")
    alphas_bar_sqrt = (alphas_bar_sqrt - a_last) * (a0 / (a0 - a_last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete variance-preserving schedule defined by its betas (float64, shape [T]).

    Accessors take a LongTensor of timestep indices and return float64 tensors on the
    same device as the indices. ᾱ is cached per device so repeated calls from a training
    loop on GPU do not re-upload the table every step.
    """

    betas: Tensor
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas).detach().to(device="cpu", dtype=torch.float64)
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be 1-D with >= 2 entries, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas must be finite and lie in (0, 1]")
        # Frozen dataclass: normalise the stored tensor once at construction.
        object.__setattr__(self, "betas", betas)
        self._cache[torch.device("cpu")] = torch.cumprod(1.0 - betas, dim=0)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.numel())

    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ_i = ∏_{j<=i} (1 - β_j), float64 on CPU (Ho et al. 2020, eq. 4)."""
        return self._cache[torch.device("cpu")]

    def _alphas_cumprod_on(self, device: torch.device) -> Tensor:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        table = self._cache.get(device)
        if table is None:
            table = self.alphas_cumprod.to(device)
            self._cache[device] = table
        return table

    def _gather(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"timesteps must be an integer tensor, got dtype {t.dtype}")
        check_range(t, 0, self.num_timesteps - 1, f"timesteps must lie in [0, {self.num_timesteps})")
        return self._alphas_cumprod_on(t.device)[t.long()]

    def alpha_bar(self, t: Tensor) -> Tensor:
        return self._gather(t)

    def alpha(self, t: Tensor) -> Tensor:
        """sqrt(ᾱ_t): the signal scale of x_t."""
        return self._gather(t).sqrt()

    def sigma(self, t: Tensor) -> Tensor:
        """sqrt(1 - ᾱ_t): the noise scale of x_t."""
        return (1.0 - self._gather(t)).sqrt()

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = ᾱ_t / (1 - ᾱ_t) (Kingma et al. 2021, eq. 1). ᾱ_t < 1 always because
        every beta is > 0, so this never divides by zero; it is exactly 0 at the end of a
        zero-terminal-SNR schedule."""
        ab = self._gather(t)
        return ab / (1.0 - ab)

    def log_snr(self, t: Tensor) -> Tensor:
        """log SNR(t); -inf where SNR is exactly 0."""
        ab = self._gather(t)
        return torch.log(ab) - torch.log1p(-ab)


def make_schedule(
    kind: ScheduleKind = "linear",
    num_timesteps: int = 1000,
    *,
    zero_terminal_snr: bool = False,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
) -> NoiseSchedule:
    """Build a :class:`NoiseSchedule` by name, optionally rescaled to zero terminal SNR."""
    if kind == "linear":
        betas = linear_betas(num_timesteps, beta_start, beta_end)
    elif kind == "cosine":
        betas = cosine_betas(num_timesteps, s=cosine_s)
    else:
        raise ValueError(f"unknown schedule kind {kind!r}; choose one of {SCHEDULE_KINDS}")
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return NoiseSchedule(betas)
