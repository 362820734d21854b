"""The named choices of the diffusion core, as ``Literal`` types: config keys and CLI choices.

Kept free of torch and diffusers so that the config schema (and with it every ``raydiff``
command's argument parsing) loads without importing them: that import is seconds of every
run's start-up (issue 18). The modules that implement each choice import its type from here.
"""

from __future__ import annotations

from typing import Literal, get_args

# What the network predicts (model/objectives.py).
PredictionType = Literal["eps", "v", "x0"]
# Per-timestep loss weighting (model/objectives.py).
Weighting = Literal["uniform", "min_snr", "p2"]
# Sampling-timestep spacing and samplers (model/samplers.py).
Spacing = Literal["leading", "trailing", "linspace"]
SamplerName = Literal["ddpm", "ddim"]
# Noise schedules (model/schedules.py).
ScheduleKind = Literal["linear", "cosine"]
# Named networks (model/registry.py builds each).
ModelName = Literal["unet-tiny", "unet-demo", "unet-small", "unet-cifar", "dit-s2", "dit-b2", "dit-l2", "dit-xl2"]

PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
SPACINGS: tuple[str, ...] = get_args(Spacing)
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
SCHEDULE_KINDS: tuple[str, ...] = get_args(ScheduleKind)
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
