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
