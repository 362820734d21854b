"""``raydiff export`` of a text-to-image model: a diffusers pipeline directory (Stable Diffusion's
layout for the U-Nets, PixArt-alpha's for the DiT) with the run's text encoder, tokenizer,
scheduler and, for latent models, the dataset's VAE; a LoRA run on a pretrained Stable Diffusion
pipeline exports merged or as adapters in diffusers' LoRA format (docs/fine-tuning.md)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from orchestrator.config import TrainConfig, config_to_yaml
from orchestrator.eval.export import export_metadata, has_lora, scheduler_for


# Text models: a diffusers pipeline directory (model_index.json + components) that
# DiffusionPipeline.from_pretrained loads: Stable Diffusion's layout for the U-Net, PixArt-alpha's
# for the DiT. Pixel-space models have no VAE: the pipeline is loaded with vae=None and called
# with output_type="latent" and vae_scale_factor 1, which returns the denoised pixels.
TEXT_PIPELINES = {"unet-text": ("StableDiffusionPipeline", "unet"), "pixart": ("PixArtAlphaPipeline", "transformer")}


def _text_model_card(meta: dict[str, Any], cfg: TrainConfig, has_vae: bool) -> str:
    pipe, s, res = meta["pipeline"], meta["sampling"], meta["resolution"]
    sched = "DDPMScheduler" if s["sampler"] == "ddpm" else "DDIMScheduler"
    extra = ', safety_checker=None, feature_extractor=None' if pipe == "StableDiffusionPipeline" else ""
    load_vae = "" if has_vae else ", vae=None"
    lora = meta.get("lora")
    if lora and lora["export"] == "adapters":
        base = (f'# Fine-tuned with LoRA (rank {lora["rank"]}, alpha {lora["alpha"]:g}): the pretrained pipeline with the adapters.\n'
                f'pipe = {pipe}.from_pretrained({meta["pretrained"]!r}{load_vae}{extra})\n'
                'pipe.load_lora_weights("OUT")  # pytorch_lora_weights.safetensors (diffusers LoRA format)\n')
    else:
        base = f'pipe = {pipe}.from_pretrained("OUT"{load_vae}{extra})\n'
    pixart_args = (f",\n              max_sequence_length={meta['text_max_length']}, clean_caption=False, use_resolution_binning=False"
                   if pipe == "PixArtAlphaPipeline" else "")
    eta = f", eta={s['eta']}" if sched == "DDIMScheduler" else ""
    if has_vae:
        tail = 'output_type="pt").images  # decoded by the VAE, in [0, 1]'
        pixels = "images = (images * 255).round().to(torch.uint8)  # pixels, NCHW\n"
    else:
        tail = 'output_type="latent").images'
        pixels = ("images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # pixels, NCHW\n")
    return f"""---
library_name: diffusers
tags: [raydiff, text-to-image, {meta['backbone']}, diffusion]
---
# {meta['model_name']} ({meta['backbone_class']}), a text-to-image model exported by raydiff

Trained with raydiff; exported from `{meta['source']}` (step {meta['step']}, {meta['weights'].upper()} weights).
{res}×{res}, {meta['channels']} channel(s){' of VAE latents' if has_vae else ', pixels in [-1, 1] (no VAE)'}.
Prediction type: `{meta['prediction']}`. Text encoder: frozen `{meta['text_encoder_class']}` (from
`{meta['text_encoder']}`), prompts padded to {meta['text_max_length']} tokens; the unconditional input of
classifier-free guidance is the empty prompt's embedding (what caption dropout trained).

## Sampling with diffusers

The same seed and settings give the images of
`raydiff sample --checkpoint {meta['source']} --prompt "a red circle" --num 1 --guidance {s['guidance_scale']:g} --seed {s['seed']} --precision fp32`
with a {pipe} loaded from this directory in float32 (`--precision fp32`: `raydiff sample` runs
the network in bf16 by default where the hardware has it). The scheduler is loaded again after the pipeline:
the run's settings exactly (StableDiffusionPipeline's constructor rewrites `clip_sample` and
`steps_offset` of schedulers it takes for outdated).

```python
import torch
from diffusers import {pipe}, {sched}

{base}pipe.scheduler = {sched}.from_pretrained("OUT", subfolder="scheduler")
{'' if has_vae else 'pipe.vae_scale_factor = 1  # pixel space: the "latents" are the image' + chr(10)}prompts = ["a red circle"]
negative = {meta['negative_prompt']!r}  # "" = the empty prompt, the trained unconditional input
images = pipe(prompts, negative_prompt=[negative] * len(prompts), height={res * (meta.get('vae_scale_factor') or 1)}, width={res * (meta.get('vae_scale_factor') or 1)},
              num_inference_steps={s['num_steps']}, guidance_scale={s['guidance_scale']:g}{eta},
              generator=torch.Generator().manual_seed({s['seed']}){pixart_args},
              {tail}
{pixels}```

raydiff draws one row of images per prompt with one generator (`--num N` images of each prompt:
pass each prompt N times here, in the same order). Guidance scale 1 or below runs the
conditional model alone in diffusers (raydiff: scale 1 only).

`raydiff.json` holds the same facts in machine-readable form.

## Training configuration

```yaml
{config_to_yaml(cfg).rstrip()}
```
"""


def dataset_vae(cfg: TrainConfig) -> tuple[Any, int]:
    """(AutoencoderKL, its downsampling factor) of a latent run: the VAE recorded in the dataset's
    ``latents.json``, checked to be the one that encoded it, with the dataset's scaling factor in
    its config (diffusers' pipelines divide latents by ``vae.config.scaling_factor``)."""
    from orchestrator.config import ConfigError
    from orchestrator.data.formats.latents import read_manifest
    from orchestrator.data.info import DataError
    from orchestrator.data.vae import load_vae, resolve_vae

    try:
        m = read_manifest(cfg.data.source, cfg.data.s3)
        spec = resolve_vae(m["vae"]["path"], what="the VAE recorded in latents.json,")
    except DataError as e:
        raise ConfigError(f"the export bundles the dataset's VAE, which cannot be used here: {e}") from None
    if spec.config_sha256 != m["vae"].get("config_sha256"):
        raise ConfigError(f"the VAE at {spec.path} is not the one that encoded {cfg.data.source} (its config differs)")
    if m.get("shift_factor") is not None:
        raise ConfigError("the latents were encoded with a shift factor, which diffusers' StableDiffusionPipeline and "
                          "PixArtAlphaPipeline do not apply. Fix: sample with `raydiff sample --prompt`")
    vae = load_vae(spec.path)
    vae.register_to_config(scaling_factor=float(m["scaling_factor"]))
    return vae, spec.downsample


def write_lora_weights(backbone: torch.nn.Module, out: Path) -> None:
    """The U-Net's adapters in diffusers' LoRA format (``pytorch_lora_weights.safetensors``, keys
    ``unet.<module>.lora_A/B.weight``, the LoraConfig in the file's metadata so that alpha / rank
    survives), which ``StableDiffusionPipeline.load_lora_weights(OUT)`` and
    ``UNet2DConditionModel.load_lora_adapter`` read (diffusers' PeftAdapterMixin)."""
    import diffusers

    from model.pretrained import lora_state_dict

    config = backbone.lora_config.to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers={k: v.detach().float().contiguous() for k, v in lora_state_dict(backbone).items()},
        unet_lora_adapter_metadata=config, safe_serialization=True)


def export_text_pipeline(model: torch.nn.Module, cfg: TrainConfig, out_dir: str | Path, *, source: str, step: int,
                         weights: str = "ema", vae: Any = None, vae_scale_factor: int | None = None,
                         lora: str = "merged") -> dict[str, Any]:
    """Write a text model as a diffusers pipeline directory (see TEXT_PIPELINES) with the run's
    frozen text encoder and tokenizer (its ``model_max_length`` set to the prompts' length), the
    scheduler, ``raydiff.json`` and ``README.md``; ``vae`` (latent models) is included when given.

    A LoRA run on a pretrained pipeline (model/pretrained.py) writes either that pipeline with the
    adapters merged into its U-Net (``lora="merged"``) or only the adapters in diffusers' LoRA format
    (``lora="adapters"``, :func:`write_lora_weights`), loaded onto the pretrained pipeline with
    ``load_lora_weights``, with the run's scheduler, ``raydiff.json`` and ``README.md``."""
    import diffusers

    from model.text_encoder import FrozenTextEncoder

    if lora not in ("merged", "adapters"):
        raise ValueError(f"lora must be 'merged' or 'adapters', got {lora!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe_name, sub = TEXT_PIPELINES[model.kind]
    enc = FrozenTextEncoder.from_pretrained(cfg.model.text_encoder, max_length=cfg.model.text_max_length)
    # diffusers' pipelines pad prompts to tokenizer.model_max_length (SD) / max_sequence_length (PixArt).
    enc.tokenizer.model_max_length = enc.max_length
    scheduler = scheduler_for(cfg)
    backbone = model.backbone
    adapters = has_lora(model) and lora == "adapters"
    if has_lora(model) and not adapters:
        from model.pretrained import merge_lora

        backbone = merge_lora(copy.deepcopy(backbone))
    was_training = backbone.training
    backbone.eval()
    try:
        if adapters:
            write_lora_weights(backbone, out)
        elif pipe_name == "StableDiffusionPipeline":
            pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=enc.model, tokenizer=enc.tokenizer,
                                                     unet=backbone, scheduler=scheduler, safety_checker=None,
                                                     feature_extractor=None, requires_safety_checker=False)
        else:
            pipe = diffusers.PixArtAlphaPipeline(tokenizer=enc.tokenizer, text_encoder=enc.model, vae=vae,
                                                 transformer=backbone, scheduler=scheduler)
        if not adapters:
            pipe.save_pretrained(out)
    finally:
        backbone.train(was_training)
    # The pipeline constructor rewrote the scheduler's config (see the model card): save ours.
    scheduler_for(cfg).save_pretrained(out / "scheduler")
    meta = export_metadata(model, cfg, None, source=source, step=step, weights=weights, lora=lora)
    meta.update(backbone=sub, pipeline=pipe_name, text_encoder=cfg.model.text_encoder,
                text_encoder_class=type(enc.model).__name__, text_max_length=enc.max_length,
                negative_prompt=cfg.sampling.negative_prompt, prompts=list(cfg.sampling.prompts),
                vae_scale_factor=vae_scale_factor, null_class=None)
    (out / "raydiff.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(_text_model_card(meta, cfg, vae is not None))
    return meta
