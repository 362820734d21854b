"""Sample grids from EMA weights: used during training, by ``raydiff sample`` and by evaluation.

Latent models (``data.format=latents``) sample latents. ``sample_grid`` decodes them with the VAE
that ``raydiff data encode`` recorded in the dataset's ``latents.json`` (loaded once per process
on the sampling device); where that VAE is not on this machine, or is not the one that encoded
the data, the grid shows latent channels 0-2 instead, with a warning. ``grid_png`` of latents
(``raydiff sample``, the evaluation grid) shows those channels too.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from model.samplers import sample
from model.schedules import NoiseSchedule
from orchestrator.builders import build_schedule
from orchestrator.config import SamplingConfig, TrainConfig


def is_latent(cfg: TrainConfig) -> bool:
    return cfg.data.format == "latents"


def schedule_from_config(cfg: TrainConfig) -> NoiseSchedule:
    """``build_schedule`` of the run's diffusion section (the samplers here and export use it)."""
    return build_schedule(cfg.diffusion)


def grid_labels(num_classes: int | None, scfg: SamplingConfig) -> torch.Tensor | None:
    """One row per class (first ``max_rows`` classes), ``per_class`` columns."""
    if num_classes is None:
        return None
    rows = min(num_classes, scfg.max_rows)
    return torch.arange(rows).repeat_interleave(scfg.per_class)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    cfg: TrainConfig,
    labels: torch.Tensor | None,
    num: int,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    scfg: SamplingConfig | None = None,
) -> torch.Tensor:
    """``num`` images in [-1, 1] from ``model`` (put EMA weights in first); latents, unclamped,
    for a latent model."""
    scfg = scfg or cfg.sampling
    was_training = model.training
    model.eval()
    try:
        kwargs = dict(
            prediction=cfg.diffusion.prediction,
            num_steps=min(scfg.num_steps, cfg.diffusion.num_timesteps),
            labels=None if labels is None else labels.to(device),
            guidance_scale=scfg.guidance_scale,
            null_label=getattr(model, "null_label", None),
            spacing=scfg.spacing,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            device=device,
            clip_sample=scfg.clip_sample,
        )
        if scfg.sampler == "ddim":
            kwargs["eta"] = scfg.eta
            kwargs["use_clipped_model_output"] = scfg.use_clipped_model_output
        shape = (num, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        out = sample(scfg.sampler, model, schedule_from_config(cfg), shape, **kwargs)
        return (out if is_latent(cfg) else out.clamp(-1, 1)).cpu()
    finally:
        model.train(was_training)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> NHWC uint8."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).numpy()


def grid_png(images: torch.Tensor, columns: int, upscale: int = 2) -> bytes:
    if images.shape[1] not in (1, 3):  # latents
        from orchestrator.data.vae import latent_preview

        images = latent_preview(images)
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    rows = math.ceil(n / columns)
    pad = 2
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y : y + h, x : x + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sample_grid(model: torch.nn.Module, cfg: TrainConfig, *, device="cpu") -> bytes:
    labels = grid_labels(getattr(model, "num_classes", None), cfg.sampling)
    num = cfg.sampling.per_class if labels is None else len(labels)
    images = generate(model, cfg, labels, num, seed=cfg.sampling.seed, device=device)
    if is_latent(cfg):
        from orchestrator.data.vae import latents_to_images

        images = latents_to_images(images, cfg.data, device=device)
    return grid_png(images, cfg.sampling.per_class)
