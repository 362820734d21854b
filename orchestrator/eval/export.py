"""Export a checkpoint as plain diffusers components: the backbone, a scheduler, a model card.

Layout of the output directory::

    unet/ or transformer/   UNet2DModel / DiTTransformer2DModel.save_pretrained (safetensors)
    scheduler/              DDIMScheduler (or DDPMScheduler for runs that sample with DDPM)
    raydiff.json            classes, null class, prediction type and sampling settings
    README.md               model card: training config, classes, a diffusers-only sampling loop

A LoRA run (``model.lora.rank`` > 0, model/pretrained.py) exports either the merged network
(``lora="merged"``: every adapter folded into its base layer, a plain diffusers model that loads,
and fine-tunes again, like any other) or the adapters alone (``lora="adapters"``: ``unet/`` or
``transformer/`` then holds PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, a few
hundred kilobytes, loaded with ``PeftModel.from_pretrained`` onto the pretrained network).
UNet2DModel and DiTTransformer2DModel have no diffusers LoRA loader (``load_lora_adapter`` is on
the PeftAdapterMixin networks, e.g. UNet2DConditionModel), so PEFT's own format is the one both
load from.

The denoiser (model/networks.py) is a thin wrapper: it maps its conditioning (``ClassLabels``,
model/conditioning.py) to ``class_labels`` and passes (x, t, class_labels) straight to the
diffusers backbone, and its "null" class for classifier-free guidance is the extra
embedding row ``num_classes`` (U-Net: ``num_class_embeds = num_classes + 1``; DiT: the
LabelEmbedding's own CFG row). So the backbone alone, fed ``class_labels = num_classes`` for
the unconditional half, reproduces raydiff's guided sampling with any diffusers scheduler whose
config matches the training schedule, which ``scheduler_for`` builds and checks.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.config import TrainConfig, config_to_yaml
from orchestrator.sampling import schedule_from_config

PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULE_TO_DIFFUSERS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
SUBFOLDER = {"unet": "unet", "dit": "transformer", "unet-text": "unet", "pixart": "transformer"}
# raydiff's linear schedule is float64 (model/schedules.py), diffusers' float32: ᾱ differs by
# rounding only. A larger gap means the configs disagree, and the export refuses.
ALPHA_BAR_TOLERANCE = 1e-5


def scheduler_for(cfg: TrainConfig):
    """A diffusers scheduler equivalent to the run's schedule and sampler settings."""
    from diffusers import DDIMScheduler, DDPMScheduler

    d, s = cfg.diffusion, cfg.sampling
    common: dict[str, Any] = dict(
        num_train_timesteps=d.num_timesteps,
        beta_schedule=SCHEDULE_TO_DIFFUSERS[d.schedule],
        # model/schedules.py's linear defaults (Ho et al. 2020); ignored by squaredcos_cap_v2.
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type=PREDICTION_TO_DIFFUSERS[d.prediction],
        rescale_betas_zero_snr=d.zero_terminal_snr,
        clip_sample=s.clip_sample,
        clip_sample_range=1.0,
        thresholding=False,
        timestep_spacing=s.spacing,
        steps_offset=0,
    )
    if s.sampler == "ddpm":
        sched = DDPMScheduler(variance_type="fixed_small", **common)
    else:
        # ᾱ_prev = 1 after the last step, as model/samplers.py does.
        sched = DDIMScheduler(set_alpha_to_one=True, **common)
    ours = schedule_from_config(cfg).alphas_cumprod.numpy()
    theirs = sched.alphas_cumprod.double().numpy()
    gap = float(np.abs(ours - theirs).max())
    if gap > ALPHA_BAR_TOLERANCE:
        raise RuntimeError(f"the diffusers scheduler's alphas_cumprod differ from raydiff's schedule by {gap:.2e}; "
                           "this diffusers version builds the schedule differently, so the export would sample wrongly")
    return sched


def has_lora(model: torch.nn.Module) -> bool:
    """Whether ``model``'s backbone carries LoRA adapters (model/pretrained.py add_lora)."""
    return hasattr(model.backbone, "lora_config")


def export_metadata(model: torch.nn.Module, cfg: TrainConfig, class_names, *, source: str, step: int,
                    weights: str, lora: str = "merged") -> dict[str, Any]:
    num_classes = getattr(model, "num_classes", None)
    s = cfg.sampling
    m = cfg.model
    return {
        "format": "diffusers",
        "backbone": SUBFOLDER[model.kind],
        "backbone_class": type(model.backbone).__name__,
        "model_name": "fine-tuned " + Path(m.pretrained).name if m.pretrained else m.name,
        # The diffusers directory the run started from (model.pretrained), and its LoRA adapters.
        "pretrained": m.pretrained,
        "lora": ({"rank": m.lora.rank, "alpha": m.lora.scale_alpha, "targets": list(m.lora.targets), "export": lora}
                 if has_lora(model) else None),
        "resolution": cfg.data.resolution,
        "channels": cfg.data.channels,
        "num_classes": num_classes,
        # The class index that means "no class" (classifier-free guidance's unconditional half).
        "null_class": num_classes if num_classes is not None else (0 if model.kind == "dit" else None),
        "class_names": list(class_names) if class_names else None,
        "prediction": cfg.diffusion.prediction,
        "sampling": {"sampler": s.sampler, "num_steps": s.num_steps, "eta": s.eta, "spacing": s.spacing,
                     "guidance_scale": s.guidance_scale, "clip_sample": s.clip_sample,
                     "use_clipped_model_output": s.use_clipped_model_output, "seed": s.seed},
        "source": source,
        "step": step,
        "weights": weights,
    }


def _loading(meta: dict[str, Any]) -> str:
    """The lines of the card's sampling loop that load the network."""
    sub, cls, lora = meta["backbone"], meta["backbone_class"], meta["lora"]
    if lora is None or lora["export"] == "merged":
        return f'model = {cls}.from_pretrained("OUT/{sub}").eval()'
    base = meta["pretrained"] + ("" if (Path(meta["pretrained"]) / "config.json").exists() else f"/{sub}")
    return (f'from peft import PeftModel\n\n'
            f'# The LoRA adapters on the pretrained network they were trained on.\n'
            f'base = {cls}.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "OUT/{sub}").merge_and_unload().eval()')


def _lora_section(meta: dict[str, Any]) -> str:
    lora = meta["lora"]
    if lora is None:
        return ""
    sub, cls = meta["backbone"], meta["backbone_class"]
    return f"""
## LoRA adapters

Fine-tuned from `{meta['pretrained']}` with LoRA adapters (rank {lora['rank']}, alpha {lora['alpha']:g}) on
{', '.join(f'`{t}`' for t in lora['targets'])}. Two ways to load it:

* merged (`raydiff export --lora merged`): `OUT/{sub}` is a full network,
  `{cls}.from_pretrained("OUT/{sub}")`;
* adapters (`raydiff export --lora adapters`): `OUT/{sub}` holds PEFT's `adapter_config.json` and
  `adapter_model.safetensors`; load the pretrained network and add them:
  `PeftModel.from_pretrained({cls}.from_pretrained(PRETRAINED), "OUT/{sub}").merge_and_unload()`
  (`from peft import PeftModel`).

This export: **{lora['export']}**.
"""


def _model_card(meta: dict[str, Any], cfg: TrainConfig) -> str:
    sub, cls = meta["backbone"], meta["backbone_class"]
    sched = "DDPMScheduler" if meta["sampling"]["sampler"] == "ddpm" else "DDIMScheduler"
    res, ch, s = meta["resolution"], meta["channels"], meta["sampling"]
    if meta["num_classes"] is None:
        classes = "Unconditional model" + (" (the DiT always receives class label 0)." if sub == "transformer" else ".")
        label_lines = "labels = None" if sub == "unet" else "labels = torch.zeros(n, dtype=torch.long)"
        guided = "    out = model(x, t, labels)"
    else:
        names = meta["class_names"] or [f"class {i}" for i in range(meta["num_classes"])]
        rows = "\n".join(f"| {i} | {n} |" for i, n in enumerate(names))
        classes = (f"Class-conditional, {meta['num_classes']} classes. Label `{meta['null_class']}` is the learned "
                   f"null class used for classifier-free guidance.\n\n| label | class |\n|---|---|\n{rows}")
        label_lines = "labels = torch.arange(n) % NUM_CLASSES  # the classes to draw"
        guided = (f"    both = model(torch.cat([x, x]), torch.cat([t, t]),\n"
                  f"                 torch.cat([labels, torch.full_like(labels, {meta['null_class']})]))\n"
                  f"    cond, uncond = both.chunk(2)\n"
                  f"    out = uncond + guidance * (cond - uncond)")
    call = ("model_fn = lambda x, t, c: model(x, t, class_labels=c).sample" if sub == "unet"
            else "model_fn = lambda x, t, c: model(x, timestep=t, class_labels=c).sample")
    guided = guided.replace("model(", "model_fn(")
    eta = f", eta={s['eta']}" if sched == "DDIMScheduler" else ""
    return f"""---
library_name: diffusers
tags: [raydiff, {sub}, diffusion, class-conditional]
---
# {meta['model_name']} ({cls}), exported by raydiff

Trained with raydiff; exported from `{meta['source']}` (step {meta['step']}, {meta['weights'].upper()} weights).
Images: {res}×{res}, {ch} channel(s), in [-1, 1]. Prediction type: `{meta['prediction']}`
(`{PREDICTION_TO_DIFFUSERS[meta['prediction']]}` in diffusers).

## Classes

{classes}

## Sampling with diffusers only

The run sampled with `{s['sampler']}`, {s['num_steps']} steps, `{s['spacing']}` spacing, guidance
scale {s['guidance_scale']:g}. Classifier-free guidance uses out = uncond + w (cond - uncond) on the
raw model output (w = 1 is the conditional model alone).

```python
import torch
from diffusers import {cls}, {sched}
{_loading(meta)}
scheduler = {sched}.from_pretrained("OUT/scheduler")
scheduler.set_timesteps({s['num_steps']})
NUM_CLASSES, n, guidance = {meta['num_classes']}, 8, {s['guidance_scale']:g}
{label_lines}
{call}
g = torch.Generator().manual_seed(0)
x = torch.randn(n, {ch}, {res}, {res}, generator=g)
for t in scheduler.timesteps:
    t = torch.full((n,), int(t))
{guided}
    x = scheduler.step(out, int(t[0]), x{eta}, generator=g).prev_sample
images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
```

`raydiff.json` holds the same facts in machine-readable form.
{_lora_section(meta)}
## Training configuration

```yaml
{config_to_yaml(cfg).rstrip()}
```
"""


def write_adapters(backbone: torch.nn.Module, out: Path, base: str | None) -> None:
    """PEFT's saved-adapter layout (what ``PeftModel.save_pretrained`` writes): adapter_config.json
    and adapter_model.safetensors with keys under ``base_model.model.``."""
    from safetensors.torch import save_file

    from model.pretrained import lora_state_dict

    config = copy.deepcopy(backbone.lora_config)
    config.base_model_name_or_path = base
    config.save_pretrained(str(out))
    save_file({f"base_model.model.{k}": v.detach().float().contiguous() for k, v in lora_state_dict(backbone).items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def export_diffusers(model: torch.nn.Module, cfg: TrainConfig, class_names, out_dir: str | Path, *,
                     source: str, step: int, weights: str = "ema", lora: str = "merged") -> dict[str, Any]:
    """Write the backbone, scheduler, ``raydiff.json`` and ``README.md`` into ``out_dir``;
    returns the metadata written to ``raydiff.json``. ``lora`` ("merged" or "adapters") says
    how a LoRA model's network is written (module docstring)."""
    if lora not in ("merged", "adapters"):
        raise ValueError(f"lora must be 'merged' or 'adapters', got {lora!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = export_metadata(model, cfg, class_names, source=source, step=step, weights=weights, lora=lora)
    backbone = model.backbone
    if has_lora(model) and lora == "adapters":
        write_adapters(backbone, out / meta["backbone"], cfg.model.pretrained)
    else:
        if has_lora(model):
            from model.pretrained import merge_lora

            backbone = merge_lora(copy.deepcopy(backbone))
        was_training = backbone.training
        backbone.eval()
        try:
            backbone.save_pretrained(out / meta["backbone"])
        finally:
            backbone.train(was_training)
    scheduler_for(cfg).save_pretrained(out / "scheduler")
    (out / "raydiff.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "README.md").write_text(_model_card(meta, cfg))
    return meta


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
