"""Ancestral DDPM and DDIM samplers.

Both follow diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` step-for-step (same timestep
lists, same previous-timestep rule, same x0 clipping, same order of random draws for a
CPU generator), so a model trained here can be sampled with either library and the
results agree to float32 rounding. Coefficients are computed in float64 from the
schedule and applied to the float32 sample.

Every sampler has one signature, ``sampler(model, x, schedule, timesteps, *, prediction,
options, generator)`` (k-diffusion's shape): ``model(x, t) -> output`` is the network already
wrapped for conditioning and guidance (model/guidance.py), ``x`` the initial noise
(:func:`initial_noise`), ``timesteps`` the descending list of :func:`timesteps_for`, and the
sampler's own knobs travel in its options dataclass. The sampler chosen is the options' type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from . import _random
from .objectives import PredictionType, check_prediction, prediction_to_x0_eps
from .schedules import NoiseSchedule
from .choices import SPACINGS, Spacing


# What the samplers call: (x_t, t [B]) -> model output, conditioning and guidance already applied.
Model = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class DDPMOptions:
    """Ancestral DDPM. ``clip_sample`` clips x̂0 to [-1, 1] (diffusers' default). DDPM has no
    η (it is ancestral, η = 1 in DDIM's terms) and no ``use_clipped_model_output``: its
    posterior mean (Ho et al. 2020, eq. 7) is built from x̂0 and x_t, never from ε̂."""

    clip_sample: bool = True


@dataclass(frozen=True)
class DDIMOptions:
    """DDIM. ``eta`` scales the noise added per step (0 = deterministic, Song et al. 2021
    eq. 16); ``clip_sample`` clips x̂0 to [-1, 1]; ``use_clipped_model_output`` recomputes ε̂
    from the clipped x̂0 (see :func:`ddim_step`)."""

    eta: float = 0.0
    clip_sample: bool = True
    use_clipped_model_output: bool = False

    def __post_init__(self) -> None:
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")


SamplerOptions = DDPMOptions | DDIMOptions


def timesteps_for(spacing: Spacing, num_steps: int, num_train_timesteps: int) -> Tensor:
    """Descending LongTensor of the ``num_steps`` timesteps visited at inference.

    Identical to diffusers' ``set_timesteps`` with ``steps_offset=0`` (the default);
    the names follow Lin et al. 2023, Table 2:
      leading : arange(n) * (T // n), reversed            -> always ends at 0 and never
                visits T-1 unless n == T;
      trailing: round(arange(T, 0, -T/n)) - 1             -> always starts at T-1 (needed to
                reach SNR = 0 with zero-terminal schedules, Lin et al. Sec. 3.3);
      linspace: round(linspace(0, T-1, n)), reversed.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not (1 <= num_steps <= num_train_timesteps):
        raise ValueError(f"num_steps must be an int in [1, {num_train_timesteps}], got {num_steps!r}")
    T, n = num_train_timesteps, num_steps
    # numpy on purpose: np.arange with a float step and np.round (half-to-even) are what
    # diffusers uses, and reproducing them bit-for-bit matters for "trailing".
    if spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    return torch.from_numpy(ts.copy())


def _coef(schedule: NoiseSchedule, t: int) -> float:
    return float(schedule.alphas_cumprod[t])


def _clip(x0: Tensor, clip_sample: bool) -> Tensor:
    # Clipping x̂0 to the data range [-1, 1] (Ho et al. 2020's released sampler, also
    # diffusers' default clip_sample=True) keeps early, very noisy x0 estimates in range.
    return x0.clamp(-1.0, 1.0) if clip_sample else x0


def ddpm_step(
    model_output: Tensor,
    t: int,
    prev_t: int,
    x_t: Tensor,
    schedule: NoiseSchedule,
    *,
    prediction: PredictionType,
    options: DDPMOptions = DDPMOptions(),
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One ancestral step x_t -> x_{prev_t} (Ho et al. 2020, eqs. 6-7) on a possibly
    respaced chain: the step's β is 1 - ᾱ_t/ᾱ_prev (the respacing of Nichol & Dhariwal
    2021, Sec. 4), variance is the posterior β̃ = (1-ᾱ_prev)/(1-ᾱ_t)·β ("fixed_small").

    Returns (x_prev, x0_hat). ``noise`` (same shape as x_t) is scaled by sqrt(β̃) and added
    when t > 0, exactly as diffusers does (including the clamp of β̃ at 1e-20).
    """
    ab_t = _coef(schedule, t)
    ab_prev = _coef(schedule, prev_t) if prev_t >= 0 else 1.0
    beta_prod_t = 1.0 - ab_t
    beta_prod_prev = 1.0 - ab_prev
    cur_alpha = ab_t / ab_prev
    cur_beta = 1.0 - cur_alpha

    x0, _ = prediction_to_x0_eps(prediction, model_output, x_t, math.sqrt(ab_t), math.sqrt(beta_prod_t))
    x0 = _clip(x0, options.clip_sample)

    # Posterior mean μ̃(x_t, x̂0), Ho et al. 2020 eq. 7.
    c_x0 = math.sqrt(ab_prev) * cur_beta / beta_prod_t
    c_xt = math.sqrt(cur_alpha) * beta_prod_prev / beta_prod_t
    x_prev = c_x0 * x0 + c_xt * x_t
    if t > 0:
        if noise is None:
            raise ValueError("ddpm_step needs `noise` for t > 0")
        var = max(beta_prod_prev / beta_prod_t * cur_beta, 1e-20)
        x_prev = x_prev + math.sqrt(var) * noise
    return x_prev, x0


def ddim_step(
    model_output: Tensor,
    t: int,
    prev_t: int,
    x_t: Tensor,
    schedule: NoiseSchedule,
    *,
    prediction: PredictionType,
    options: DDIMOptions = DDIMOptions(),
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM step (Song et al. 2021, eq. 12) with σ_t(η) from eq. 16:
        x_prev = sqrt(ᾱ_prev) x̂0 + sqrt(1 - ᾱ_prev - σ²) ε̂ + σ z,
        σ = η sqrt((1-ᾱ_prev)/(1-ᾱ_t)) sqrt(1 - ᾱ_t/ᾱ_prev).
    For prev_t < 0, ᾱ_prev = 1 (diffusers' default ``set_alpha_to_one=True``), so the
    last step returns x̂0. By default ε̂ is the *unclipped* model estimate (diffusers'
    ``use_clipped_model_output=False``); with ``options.use_clipped_model_output`` it is recomputed
    from the clipped x̂0, ε̂ = (x_t - sqrt(ᾱ_t) x̂0)/sqrt(1-ᾱ_t), so that x̂0 and ε̂ again
    describe the same x_t. Without that, clipping at high noise leaves the energy removed
    from x̂0 in ε̂, and eps-prediction samples keep a grey, noisy background.
    Returns (x_prev, x0_hat)."""
    ab_t = _coef(schedule, t)
    ab_prev = _coef(schedule, prev_t) if prev_t >= 0 else 1.0
    eta = options.eta
    x0, eps = prediction_to_x0_eps(prediction, model_output, x_t, math.sqrt(ab_t), math.sqrt(1.0 - ab_t))
    x0 = _clip(x0, options.clip_sample)
    if options.use_clipped_model_output and options.clip_sample:
        eps = (x_t.float() - math.sqrt(ab_t) * x0) / math.sqrt(1.0 - ab_t)
    var = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)
    std = eta * math.sqrt(var)
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(max(1.0 - ab_prev - std**2, 0.0)) * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step needs `noise` when eta > 0")
        x_prev = x_prev + std * noise
    return x_prev, x0


def initial_noise(shape, *, generator: torch.Generator | None = None, device="cpu") -> Tensor:
    """x_T ~ N(0, I) in float32, drawn first from ``generator`` (on its own device, then moved),
    as diffusers' pipelines draw it; the samplers then draw their per-step noise from the same
    generator, so one seed fixes the whole chain."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (batch, ...) with positive sizes, got {shape}")
    return _random.randn(shape, generator=generator, device=device)


def _prepare(model: Model, x: Tensor, schedule: NoiseSchedule, timesteps, prediction: str):
    """Checks shared by the samplers; returns the timesteps as ints and a ``predict(x, t)``
    that calls the model with a [B] timestep tensor and returns its float32 output."""
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    check_prediction(prediction)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"x must be a batch (B, ...) of initial noise, got shape {tuple(x.shape)}")
    T = schedule.num_timesteps
    ts = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
    if not ts or any(not 0 <= t < T for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be a non-empty, strictly descending list in [0, {T}) "
                         f"(see timesteps_for), got {ts[:5]}{'...' if len(ts) > 5 else ''}")
    if prediction == "eps" and _coef(schedule, ts[0]) == 0.0:
        raise ValueError(
            "eps-prediction cannot start from a timestep with SNR = 0 (zero-terminal-SNR schedule): "
            "x0 = (x_t - σ ε)/sqrt(ᾱ) is undefined there; use prediction='v' (Lin et al. 2023, Sec. 3.2)"
        )
    batch = x.shape[0]

    def predict(x: Tensor, t: int) -> Tensor:
        out = model(x, torch.full((batch,), t, dtype=torch.long, device=x.device))
        if out.shape != x.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} != sample shape {tuple(x.shape)}")
        return out.float()

    return ts, predict


@torch.no_grad()
def ddpm_sample(
    model: Model,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps,
    *,
    prediction: PredictionType,
    options: DDPMOptions = DDPMOptions(),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) from the initial noise ``x`` over
    ``timesteps`` (all T, or respaced). The previous timestep is the next entry of the list
    (-1 after the last), as in diffusers' DDPMScheduler after ``set_timesteps``. Per-step noise
    is drawn from ``generator``. Put the network in eval mode first."""
    ts, predict = _prepare(model, x, schedule, timesteps, prediction)
    x = x.float()
    for i, t in enumerate(ts):
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        out = predict(x, t)
        z = _random.randn(x.shape, generator=generator, device=x.device) if t > 0 else None
        x, _ = ddpm_step(out, t, prev_t, x, schedule, prediction=prediction, options=options, noise=z)
    return x


@torch.no_grad()
def ddim_sample(
    model: Model,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps,
    *,
    prediction: PredictionType,
    options: DDIMOptions = DDIMOptions(),
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) from the initial noise ``x``; η = 0 is
    deterministic given ``x``. The previous timestep is t - T // len(timesteps) for every
    spacing, which is what diffusers' DDIMScheduler.step does (for "linspace"/"trailing" with
    T % n != 0 this is not exactly the next listed timestep; we keep diffusers' rule for
    compatibility)."""
    ts, predict = _prepare(model, x, schedule, timesteps, prediction)
    x = x.float()
    stride = schedule.num_timesteps // len(ts)
    for t in ts:
        out = predict(x, t)
        z = _random.randn(x.shape, generator=generator, device=x.device) if options.eta > 0 else None
        x, _ = ddim_step(out, t, t - stride, x, schedule, prediction=prediction, options=options, noise=z)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddpm": ddpm_sample, "ddim": ddim_sample}


def sample(
    model: Model,
    x: Tensor,
    schedule: NoiseSchedule,
    timesteps,
    *,
    prediction: PredictionType,
    options: SamplerOptions,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The sampler that ``options`` configures (:class:`DDPMOptions` or :class:`DDIMOptions`)."""
    if isinstance(options, DDIMOptions):
        return ddim_sample(model, x, schedule, timesteps, prediction=prediction, options=options, generator=generator)
    if isinstance(options, DDPMOptions):
        return ddpm_sample(model, x, schedule, timesteps, prediction=prediction, options=options, generator=generator)
    raise ValueError(f"unknown sampler options {type(options).__name__}; give DDPMOptions or DDIMOptions")
