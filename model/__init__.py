"""raydiff diffusion core: schedules, objectives, samplers, EMA and model registry.

Plain PyTorch + diffusers building blocks; nothing here knows about Ray or
torch.distributed (enforced by tests/test_model_imports.py), so every piece can be unit
tested on a CPU and reused by any training loop.
"""

from .conditioning import ClassLabels, Conditioning, class_conditioning
from .ema import EMA
from .guidance import CFGDenoiser
from .networks import Denoiser
from .objectives import (
    PREDICTION_TYPES,
    WEIGHTINGS,
    DiffusionObjective,
    LossOutput,
    PredictionType,
    Weighting,
    loss_per_timestep_bin,
    prediction_to_x0_eps,
)
from .registry import MODEL_NAMES, ModelName, build_model, count_parameters
from .samplers import (
    SAMPLER_NAMES,
    SAMPLERS,
    SPACINGS,
    DDIMOptions,
    DDPMOptions,
    SamplerName,
    SamplerOptions,
    Spacing,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    initial_noise,
    sample,
    timesteps_for,
)
from .schedules import (
    SCHEDULE_KINDS,
    NoiseSchedule,
    ScheduleKind,
    cosine_betas,
    linear_betas,
    make_schedule,
    rescale_zero_terminal_snr,
)

__all__ = [
    "CFGDenoiser",
    "ClassLabels",
    "Conditioning",
    "DDIMOptions",
    "DDPMOptions",
    "EMA",
    "MODEL_NAMES",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SAMPLER_NAMES",
    "SCHEDULE_KINDS",
    "SPACINGS",
    "WEIGHTINGS",
    "Denoiser",
    "DiffusionObjective",
    "LossOutput",
    "ModelName",
    "NoiseSchedule",
    "PredictionType",
    "SamplerName",
    "SamplerOptions",
    "ScheduleKind",
    "Spacing",
    "Weighting",
    "build_model",
    "class_conditioning",
    "cosine_betas",
    "count_parameters",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "initial_noise",
    "linear_betas",
    "loss_per_timestep_bin",
    "make_schedule",
    "prediction_to_x0_eps",
    "rescale_zero_terminal_snr",
    "sample",
    "timesteps_for",
]
