"""What training is made of, each built from its own config section: the network, the noise
schedule, the objective and the learning-rate schedule.

This module sits low in the import graph (model/ and the config only), so training, tuning,
evaluation, benchmarks and MFU tracking all build the same objects without importing the driver
or the checkpoint layout.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from model.objectives import DiffusionObjective
from model.registry import build_model
from model.schedules import NoiseSchedule, make_schedule
from orchestrator.config import ConfigError, DataConfig, DiffusionConfig, ModelConfig, OptimConfig


def build_denoiser(model: ModelConfig, data: DataConfig, num_classes: int | None, *,
                   weights: bool = True) -> torch.nn.Module:
    """The registry network ``model`` names, sized for ``data``'s images (or latents);
    class-conditional when ``num_classes`` is given (the number of classes found in the data);
    a text model's cross-attention is as wide as ``model.text_encoder``'s hidden size (read
    from its config), and it takes no class labels.

    With ``model.pretrained`` the network and its weights come from that diffusers directory
    (``weights=False``: its architecture only, for counting parameters on the meta device), with
    LoRA adapters when ``model.lora.rank`` > 0 (model/pretrained.py)."""
    if model.pretrained is None:
        from orchestrator.text import text_dim

        dim = text_dim(model)
        try:
            return build_model(model.name, in_channels=data.channels, image_size=data.resolution,
                               num_classes=None if dim is not None else num_classes, text_dim=dim,
                               arch=model.unet or model.dit)
        except (ValueError, TypeError) as e:
            if model.unet is None and model.dit is None:
                raise
            raise ConfigError(f"model.{'unet' if model.unet is not None else 'dit'}: diffusers cannot build "
                              f"{model.name} with these arguments: {e}") from None
    from model.pretrained import PretrainedError, add_lora, build_pretrained, read_pretrained

    try:
        info = read_pretrained(model.pretrained)
    except PretrainedError as e:
        raise ConfigError(f"model.pretrained: {e}") from None
    if num_classes != info.num_classes:
        raise ConfigError(f"model.pretrained={model.pretrained} is "
                          + (f"a {info.num_classes}-class model" if info.num_classes else "unconditional")
                          + f" but the data gives {num_classes or 'no'} classes. Fix: train on data with "
                          + (f"{info.num_classes} classes (the same class order)" if info.num_classes
                             else "data.conditional=false"))
    if info.text_dim is not None:
        from orchestrator.text import text_dim

        dim = text_dim(model)
        if dim != info.text_dim:
            raise ConfigError(f"model.text_encoder={model.text_encoder} has hidden size {dim} but "
                              f"{info.model_dir} cross-attends to width {info.text_dim} (cross_attention_dim). Fix: use "
                              "the text encoder the pipeline was trained with (leave model.text_encoder unset to take "
                              "the pipeline's own)")
    net = build_pretrained(info, weights=weights)
    if model.lora.rank:
        try:
            add_lora(net.backbone, model.lora.rank, model.lora.scale_alpha, model.lora.targets)
        except PretrainedError as e:
            raise ConfigError(str(e)) from None
    return net


def trainable_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter elements."""
    total = sum(p.numel() for p in module.parameters())
    return sum(p.numel() for p in module.parameters() if p.requires_grad), total


def build_schedule(diffusion: DiffusionConfig) -> NoiseSchedule:
    return make_schedule(diffusion.schedule, diffusion.num_timesteps, zero_terminal_snr=diffusion.zero_terminal_snr)


def build_objective(diffusion: DiffusionConfig) -> DiffusionObjective:
    """The training loss on ``build_schedule(diffusion)``: prediction target, loss weighting and
    conditioning dropout (``diffusion.label_dropout``: classifier-free guidance's unconditional
    branch, Ho & Salimans 2022)."""
    return DiffusionObjective(
        build_schedule(diffusion),
        diffusion.prediction,
        diffusion.weighting,
        min_snr_gamma=diffusion.min_snr_gamma,
        p2_gamma=diffusion.p2_gamma,
        p2_k=diffusion.p2_k,
        cond_dropout=diffusion.label_dropout,
    )


def lr_lambda(optim: OptimConfig) -> Callable[[int], float]:
    """The factor on ``optim.lr`` after a number of optimizer steps (for ``LambdaLR``): linear
    warm-up, then cosine decay to ``min_lr_ratio`` of the peak (Loshchilov & Hutter 2017)."""
    o = optim

    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        span = max(1, o.steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
