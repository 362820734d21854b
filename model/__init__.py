"""raydiff diffusion core: schedules, objectives, samplers, EMA and model registry.

Plain PyTorch + diffusers building blocks; nothing here knows about Ray or
torch.distributed (enforced by tests/test_model_imports.py), so every piece can be unit
tested on a CPU and reused by any training loop.

Importing the package imports nothing heavy: each name is loaded from its module on first use
(PEP 562), so that ``model.choices`` (the config schema's choices) costs no torch or diffusers
import, seconds of every command's start-up.
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES: dict[str, tuple[str, ...]] = {
    "choices": ("MODEL_NAMES", "PREDICTION_TYPES", "SAMPLER_NAMES", "SCHEDULE_KINDS", "SPACINGS", "WEIGHTINGS",
                "ModelName", "PredictionType", "SamplerName", "ScheduleKind", "Spacing", "Weighting"),
    "conditioning": ("ClassLabels", "Conditioning", "class_conditioning"),
    "ema": ("EMA",),
    "guidance": ("CFGDenoiser",),
    "networks": ("Denoiser",),
    "objectives": ("DiffusionObjective", "LossOutput", "loss_per_timestep_bin", "prediction_to_x0_eps"),
    "registry": ("build_model", "count_parameters"),
    "samplers": ("SAMPLERS", "DDIMOptions", "DDPMOptions", "SamplerOptions", "ddim_sample", "ddim_step",
                 "ddpm_sample", "ddpm_step", "initial_noise", "sample", "timesteps_for"),
    "schedules": ("NoiseSchedule", "cosine_betas", "linear_betas", "make_schedule", "rescale_zero_terminal_snr"),
}
_MODULE_OF: dict[str, str] = {name: module for module, names in _SOURCES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))


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
