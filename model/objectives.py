"""Training objective for discrete-time Gaussian diffusion.

The network only predicts; :class:`DiffusionObjective` owns the forward process (noising),
the regression target for the chosen parameterisation, the per-timestep loss weight and
classifier-free-guidance conditioning dropout (through the conditioning object of
model/conditioning.py, whatever its kind) -- the same split as DiT's
``diffusion.training_losses`` or k-diffusion's ``Denoiser``.

Notation: α = sqrt(ᾱ_t), σ = sqrt(1 - ᾱ_t), SNR = α²/σ², x_t = α x0 + σ ε.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import _random
from ._checks import check_range
from .conditioning import Conditioning
from .schedules import NoiseSchedule
from .choices import PREDICTION_TYPES, WEIGHTINGS, PredictionType, Weighting  # torch-free: the config schema reads them



def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTION_TYPES}")


def _expand(coef: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample coefficient [B] so it broadcasts against x [B, ...]."""
    coef = torch.as_tensor(coef, device=like.device)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (like.ndim - 1)))


def prediction_to_x0_eps(
    prediction: PredictionType, model_output: Tensor, x_t: Tensor, alpha, sigma
) -> tuple[Tensor, Tensor]:
    """Convert a network output of any parameterisation to (x0_hat, eps_hat).

    ``alpha``/``sigma`` are sqrt(ᾱ_t)/sqrt(1-ᾱ_t) as python floats, 0-d tensors or [B]
    tensors. Formulas:
      eps: x0 = (x_t - σ ε̂)/α                       (Ho et al. 2020, eq. 15)
      x0 : ε = (x_t - α x̂0)/σ
      v  : x0 = α x_t - σ v̂,  ε = α v̂ + σ x_t       (Salimans & Ho 2022, Sec. 4 / App. D)
    The eps branch divides by α, which is 0 at the last step of a zero-terminal-SNR
    schedule; callers (the samplers) reject that combination up front.
    """
    check_prediction(prediction)
    if not isinstance(alpha, (int, float)):
        alpha = _expand(alpha, x_t).to(x_t.dtype)
    if not isinstance(sigma, (int, float)):
        sigma = _expand(sigma, x_t).to(x_t.dtype)
    if prediction == "eps":
        eps = model_output
        x0 = (x_t - sigma * eps) / alpha
    elif prediction == "x0":
        x0 = model_output
        eps = (x_t - alpha * x0) / sigma
    else:  # "v"
        x0 = alpha * x_t - sigma * model_output
        eps = alpha * model_output + sigma * x_t
    return x0, eps


@dataclass
class LossOutput:
    """Result of :meth:`DiffusionObjective.training_losses`.

    loss:       scalar, mean over the batch of the weighted per-sample losses (has grad).
    per_sample: [B] weighted per-sample losses, detached (for logging / timestep bins).
    t:          [B] LongTensor of the timesteps used.
    weights:    [B] float32 loss weights that were applied.
    """

    loss: Tensor
    per_sample: Tensor
    t: Tensor
    weights: Tensor


class DiffusionObjective:
    """Noises data, builds the regression target, weights and reduces the loss.

    Loss weights are expressed on the *native* MSE of the chosen parameterisation.
    Using ε - ε̂ = -(α/σ)(x0 - x̂0) and v - v̂ = -(1/σ)(x0 - x̂0) (from x0 = α x_t - σ v):
        ||ε-ε̂||² = SNR · ||x0-x̂0||²,   ||v-v̂||² = (SNR+1) · ||x0-x̂0||².
    * ``uniform``: weight 1 on the native MSE ("L_simple", Ho et al. 2020 eq. 14).
    * ``min_snr`` (Hang et al. 2023, eq. 6 & Sec. 3.4): the x0-space weight min(SNR, γ)
      converted to the native loss: x0 → min(SNR,γ); eps → min(SNR,γ)/SNR;
      v → min(SNR,γ)/(SNR+1). For eps we evaluate min(SNR,γ)/SNR as
      ``where(SNR > γ, γ/SNR, 1)``, which is the same function but also finite at SNR = 0
      (zero-terminal schedules), where its limit is 1.
    * ``p2`` (Choi et al. 2022, eq. 8): λ'_t = 1/(k + SNR)^γ on the eps-MSE. For v/x0 we
      keep the *same objective* and convert the weight with the factors above:
      x0 → SNR/(k+SNR)^γ; v → SNR/((SNR+1)(k+SNR)^γ). Thus p2 with v or x0 prediction
      optimises exactly the eps-space P2 loss, just with a different network output.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction: PredictionType = "eps",
        weighting: Weighting = "uniform",
        *,
        min_snr_gamma: float = 5.0,
        p2_gamma: float = 1.0,
        p2_k: float = 1.0,
        cond_dropout: float = 0.1,
    ) -> None:
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        check_prediction(prediction)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        if p2_gamma < 0:
            raise ValueError(f"p2_gamma must be >= 0, got {p2_gamma}")
        if not p2_k > 0:
            raise ValueError(f"p2_k must be > 0 (it keeps 1/(k+SNR) finite), got {p2_k}")
        if not (0.0 <= cond_dropout <= 1.0):
            raise ValueError(f"cond_dropout must be in [0, 1], got {cond_dropout}")
        self.schedule = schedule
        self.prediction: PredictionType = prediction
        self.weighting: Weighting = weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.p2_gamma = float(p2_gamma)
        self.p2_k = float(p2_k)
        self.cond_dropout = float(cond_dropout)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    # -- forward process -------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε (Ho et al. 2020, eq. 4)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        t = t.to(x0.device)
        # Coefficients come from the float64 table; the arithmetic runs in at least fp32
        # (not fp64, which is slow on most accelerators) and is cast back to x0's dtype.
        work = torch.promote_types(x0.dtype, torch.float32)
        a = _expand(self.schedule.alpha(t), x0).to(work)
        s = _expand(self.schedule.sigma(t), x0).to(work)
        return (a * x0.to(work) + s * noise.to(work)).to(x0.dtype)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Regression target: ε, x0, or v = α ε - σ x0 (Salimans & Ho 2022, Sec. 4)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        t = t.to(x0.device)
        work = torch.promote_types(x0.dtype, torch.float32)
        a = _expand(self.schedule.alpha(t), x0).to(work)
        s = _expand(self.schedule.sigma(t), x0).to(work)
        return (a * noise.to(work) - s * x0.to(work)).to(x0.dtype)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight [B] (float32) on the native MSE; see the class docstring."""
        snr = self.schedule.snr(t)  # float64
        if self.weighting == "uniform":
            w = torch.ones_like(snr)
        elif self.weighting == "min_snr":
            g = self.min_snr_gamma
            if self.prediction == "eps":
                w = torch.where(snr > g, g / snr.clamp(min=g), torch.ones_like(snr))
            elif self.prediction == "v":
                w = snr.clamp(max=g) / (snr + 1.0)
            else:
                w = snr.clamp(max=g)
        else:  # p2
            w_eps = (self.p2_k + snr) ** (-self.p2_gamma)
            if self.prediction == "eps":
                w = w_eps
            elif self.prediction == "v":
                w = w_eps * snr / (snr + 1.0)
            else:
                w = w_eps * snr
        return w.float()

    # -- conversions -------------------------------------------------------------------
    def predict_x0_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.to(x_t.device)
        return prediction_to_x0_eps(
            self.prediction, model_output, x_t, self.schedule.alpha(t), self.schedule.sigma(t)
        )

    # -- classifier-free guidance --------------------------------------------------------
    def drop_cond(self, cond: Conditioning | None, *, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> Conditioning | None:
        """Replace each sample's conditioning by the null conditioning (the null class for class
        labels) with probability ``cond_dropout``, so one network learns both p(x|c) and p(x)
        (Ho & Salimans 2022, Algorithm 1). Unconditional training (``cond`` None) draws nothing.
        ``device``: where ``cond`` lives (the batch's device); the mask is drawn on the generator's."""
        if cond is None or self.cond_dropout == 0.0:
            return cond
        drop = _random.rand((cond.batch_size,), generator=generator, device=device) < self.cond_dropout
        return cond.drop(drop)

    # -- the loss ------------------------------------------------------------------------
    def training_losses(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        cond: Conditioning | None = None,
        *,
        generator: torch.Generator | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> LossOutput:
        """Sample t ~ U{0..T-1} and ε ~ N(0, I) (from ``generator``), apply conditioning dropout,
        call ``model(x_t, t, cond)`` and return the weighted MSE.

        Random draws happen in a fixed order (t, noise, conditioning dropout) so a seeded
        generator fully determines the batch. The loss is computed in float32 even for
        bf16/fp16 model outputs: squaring small residuals in half precision loses most of
        the signal at low-noise timesteps.
        """
        if x0.ndim < 2:
            raise ValueError(f"x0 must have a batch dimension and at least one data dim, got shape {tuple(x0.shape)}")
        b = x0.shape[0]
        device = x0.device
        if t is None:
            t = _random.randint(self.num_timesteps, (b,), generator=generator, device=device)
        else:
            t = torch.as_tensor(t, device=device)
            if t.shape != (b,):
                raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
            t = t.long()
        if noise is None:
            noise = _random.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        if cond is not None and cond.batch_size != b:
            raise ValueError(f"conditioning has {cond.batch_size} entries but the batch has {b}")
        model_cond = self.drop_cond(cond.to(device) if cond is not None else None, generator=generator, device=device)

        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, model_cond)
        if out.shape != x0.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} != input shape {tuple(x0.shape)}")
        target = self.target(x0.float(), noise.float(), t)
        mse = ((out.float() - target) ** 2).flatten(1).mean(dim=1)
        weights = self.loss_weight(t).to(device)
        weighted = mse * weights
        return LossOutput(loss=weighted.mean(), per_sample=weighted.detach(), t=t, weights=weights)


def loss_per_timestep_bin(
    t: Tensor, per_sample: Tensor, num_timesteps: int, num_bins: int = 10
) -> tuple[Tensor, Tensor]:
    """Sum and count per-sample losses in ``num_bins`` equal-width timestep bins.

    Returns (sums, counts), both float32 of shape [num_bins] on ``per_sample``'s device,
    so a distributed caller can all-reduce one concatenated buffer and divide afterwards
    (averaging per-worker means would weight workers, not samples).
    """
    if num_bins < 1 or num_timesteps < 1:
        raise ValueError(f"num_bins and num_timesteps must be >= 1, got {num_bins}, {num_timesteps}")
    if t.shape != per_sample.shape or t.ndim != 1:
        raise ValueError(f"t and per_sample must be 1-D with equal shape, got {tuple(t.shape)}, {tuple(per_sample.shape)}")
    t = t.to(per_sample.device).long()
    check_range(t, 0, num_timesteps - 1, f"t must lie in [0, {num_timesteps})")
    bins = (t * num_bins) // num_timesteps
    sums = torch.zeros(num_bins, dtype=torch.float32, device=per_sample.device)
    counts = torch.zeros(num_bins, dtype=torch.float32, device=per_sample.device)
    sums.index_add_(0, bins, per_sample.detach().float())
    counts.index_add_(0, bins, torch.ones_like(per_sample, dtype=torch.float32))
    return sums, counts
