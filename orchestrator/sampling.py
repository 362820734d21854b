"""Sample grids from EMA weights: used during training, by ``raydiff sample`` and by evaluation.

Latent models (``data.format=latents``) sample latents. ``sample_grid`` decodes them with the VAE
that ``raydiff data encode`` recorded in the dataset's ``latents.json`` (loaded once per process
on the sampling device); where that VAE is not on this machine, or is not the one that encoded
the data, the grid shows latent channels 0-2 instead, with a warning. ``grid_png`` of latents
(``raydiff sample``, the evaluation grid) shows those channels too.

What to draw arrives as a conditioning object (model/conditioning.py, None for an unconditional
model); guidance wraps the network (model/guidance.py) before the sampler sees it.
"""

from __future__ import annotations

import copy
import io
import math
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image

from model.conditioning import Conditioning, class_conditioning
from model.guidance import CFGDenoiser
from model.samplers import DDIMOptions, DDPMOptions, SamplerOptions, initial_noise, sample, timesteps_for
from model.schedules import NoiseSchedule
from orchestrator.builders import build_schedule
from orchestrator.config import ConfigError, SamplePrecision, SamplingConfig, TrainConfig

if TYPE_CHECKING:
    from orchestrator.text import TextConditioner


def is_latent(cfg: TrainConfig) -> bool:
    return cfg.data.format == "latents"


def schedule_from_config(cfg: TrainConfig) -> NoiseSchedule:
    """``build_schedule`` of the run's diffusion section (the samplers here and export use it)."""
    return build_schedule(cfg.diffusion)


class SamplerSettings(Protocol):
    """The sampler fields of ``SamplingConfig`` (and of ``raydiff bench quality``'s specs)."""

    sampler: str
    eta: float
    clip_sample: bool
    use_clipped_model_output: bool


def sampler_options(s: SamplerSettings) -> SamplerOptions:
    """The options of the sampler ``s.sampler`` names; DDPM takes no eta (it is ancestral)."""
    if s.sampler == "ddpm":
        return DDPMOptions(clip_sample=s.clip_sample)
    if s.sampler == "ddim":
        return DDIMOptions(eta=s.eta, clip_sample=s.clip_sample, use_clipped_model_output=s.use_clipped_model_output)
    raise ValueError(f"unknown sampler {s.sampler!r}; choose ddpm or ddim")


def grid_labels(num_classes: int | None, scfg: SamplingConfig) -> torch.Tensor | None:
    """One row per class (first ``max_rows`` classes), ``per_class`` columns."""
    if num_classes is None:
        return None
    rows = min(num_classes, scfg.max_rows)
    return torch.arange(rows).repeat_interleave(scfg.per_class)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sample_dtype(precision: SamplePrecision, device: torch.device | str) -> torch.dtype:
    """The network's dtype for ``sampling.precision`` on ``device``; "auto" is the fastest that
    keeps the images: bf16 where the hardware computes it natively (CPUs with AVX512-BF16/AMX,
    GPUs since Ampere), fp16 on older GPUs, fp32 elsewhere."""
    from orchestrator.plan import cpu_has_bf16

    device = torch.device(device)
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError("sampling.precision=fp16 (--precision) on a CPU: PyTorch's CPU kernels compute "
                              "fp16 slowly or not at all. Fix: bf16, fp32 or auto")
        return _DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32


class _AtPrecision(torch.nn.Module):
    """Runs the network in ``dtype`` and hands the sampler float32: the sampler's updates mix
    the network's output with x_t under coefficients near 0 and 1, and bf16's 8-bit mantissa
    would lose the small differences that each step adds."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = copy.deepcopy(inner).to(dtype)
        self.compute_dtype = dtype
        self.train(inner.training)

    def forward(self, x, t, cond: Conditioning | None = None):
        return self.inner(x.to(self.compute_dtype), t, cond).float()


def at_precision(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` itself for float32, else a copy in ``dtype`` that returns float32 (the caller's
    weights, an EMA for one, keep their precision)."""
    return model if dtype == torch.float32 else _AtPrecision(model, dtype)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    cfg: TrainConfig,
    cond: Conditioning | None,
    num: int,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    scfg: SamplingConfig | None = None,
    cast: bool = True,
) -> torch.Tensor:
    """``num`` images in [-1, 1] from ``model`` (put EMA weights in first) conditioned on ``cond``
    (``num`` entries; None for an unconditional model); latents, unclamped, for a latent model.
    The initial noise and then the sampler's per-step noise come from one CPU generator seeded
    ``seed``. The network runs at ``sampling.precision`` (``cast=False``: the caller has put it
    there already, ``at_precision``)."""
    scfg = scfg or cfg.sampling
    if cond is not None and cond.batch_size != num:
        raise ValueError(f"conditioning for {cond.batch_size} samples given for {num} images")
    was_training = model.training
    model.eval()
    try:
        schedule = schedule_from_config(cfg)
        T = schedule.num_timesteps
        timesteps = timesteps_for(scfg.spacing, min(scfg.num_steps, T), T)
        g = torch.Generator(device="cpu").manual_seed(seed)
        side = cfg.data.resolution
        x = initial_noise((num, cfg.data.channels, side, side), generator=g, device=device)
        net = at_precision(model, sample_dtype(scfg.precision, device)) if cast else model
        guided = CFGDenoiser(net, None if cond is None else cond.to(device), scfg.guidance_scale)
        out = sample(guided, x, schedule, timesteps, prediction=cfg.diffusion.prediction,
                     options=sampler_options(scfg), generator=g)
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


def text_grid_conditioning(text: "TextConditioner", scfg: SamplingConfig) -> Conditioning:
    """One row per grid prompt, ``per_class`` columns, guided against ``sampling.negative_prompt``."""
    rows = scfg.grid_prompts()
    return text.prompts([p for p in rows for _ in range(scfg.per_class)], scfg.negative_prompt)


def sample_grid(model: torch.nn.Module, cfg: TrainConfig, *, device="cpu", text: "TextConditioner | None" = None) -> bytes:
    num_classes = getattr(model, "num_classes", None)
    if getattr(model, "text_dim", None) is not None:
        if text is None:
            raise ValueError("a text model's grid needs its text encoder (orchestrator.text.TextConditioner)")
        cond = text_grid_conditioning(text, cfg.sampling)
    else:
        cond = class_conditioning(grid_labels(num_classes, cfg.sampling), num_classes)
    num = cfg.sampling.per_class if cond is None else cond.batch_size
    images = generate(model, cfg, cond, num, seed=cfg.sampling.seed, device=device)
    if is_latent(cfg):
        from orchestrator.data.vae import latents_to_images

        images = latents_to_images(images, cfg.data, device=device)
    return grid_png(images, cfg.sampling.per_class)
