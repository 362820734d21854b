"""``raydiff export``: a checkpoint as diffusers components (see orchestrator/eval/export.py)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.cli.sample import SAMPLE_OVERRIDES, add_checkpoint_args, checkpoint_uri, s3_from_overrides
from orchestrator.config import ConfigError, apply_overrides, config_to_dict, validate_config


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint's denoiser as diffusers components (EMA weights)",
        description="Write OUT/unet (or OUT/transformer), OUT/scheduler, OUT/raydiff.json and a model "
        "card OUT/README.md. Load them with UNet2DModel.from_pretrained(OUT/unet) / "
        "DiTTransformer2DModel.from_pretrained(OUT/transformer) and DDIMScheduler.from_pretrained(OUT/scheduler). "
        "A LoRA run (model.lora.rank > 0) exports the merged network (--lora merged, the default: adapters folded "
        "into the pretrained weights, a full diffusers model that also serves as model.pretrained) or the adapters "
        "alone (--lora adapters: PEFT's adapter_config.json + adapter_model.safetensors in OUT/unet or "
        "OUT/transformer, loaded with peft.PeftModel.from_pretrained onto the pretrained network). A text model "
        "is written as a diffusers pipeline directory; a LoRA run on a Stable Diffusion pipeline exports it merged, "
        "or its adapters as OUT/pytorch_lora_weights.safetensors for pipe.load_lora_weights(OUT). The model card "
        "shows how to load.",
    )
    add_checkpoint_args(p)
    p.add_argument("--format", choices=("diffusers",), default="diffusers")
    p.add_argument("--lora", choices=("merged", "adapters"), default="merged",
                   help="for a LoRA run: write the merged network (default) or only the adapters (a few hundred KB)")
    p.add_argument("--force", action="store_true", help="write into OUT even if it is not empty")
    p.add_argument("out", metavar="OUT", help="output directory (local)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="sampling.* (the exported scheduler's spacing, clipping) and storage.s3.* overrides")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from orchestrator.eval.export import export_diffusers, has_lora
    from orchestrator.eval.loading import load_checkpoint
    from orchestrator.sampling import is_latent

    if "://" in args.out:
        raise ConfigError(f"export OUT {args.out!r}: diffusers writes to a local directory. Fix: give a local path "
                          "and upload it afterwards")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        raise ConfigError(f"export OUT {args.out!r} exists and is not an empty directory. Fix: choose another OUT or "
                          "pass --force")
    s3 = s3_from_overrides(args.overrides, SAMPLE_OVERRIDES, "export")
    uri, name = checkpoint_uri(args)
    ck = load_checkpoint(uri, s3, raw=args.raw, name=name)
    if args.lora == "adapters" and not has_lora(ck.model):
        raise ConfigError(f"--lora adapters: {ck.uri} has no LoRA adapters (model.lora.rank=0: every weight trained). "
                          "Fix: drop --lora to export the whole network")
    if getattr(ck.model, "text_dim", None) is not None:
        from orchestrator.eval.export_text import dataset_vae, export_text_pipeline

        cfg = validate_config(apply_overrides(config_to_dict(ck.cfg, reveal_secrets=True),
                                              [o for o in args.overrides if o.startswith("sampling.")]))
        vae, factor = dataset_vae(cfg) if is_latent(cfg) else (None, None)
        meta = export_text_pipeline(ck.model, cfg, out, source=ck.uri, step=ck.ref.step, weights=ck.weights,
                                    vae=vae, vae_scale_factor=factor, lora=args.lora)
        if meta["lora"] and args.lora == "adapters":
            print(f"exported {ck.uri} (step {ck.ref.step}, {ck.weights.upper()} weights) to {out}: the "
                  f"{meta['backbone_class']}'s LoRA adapters in diffusers' format (pytorch_lora_weights.safetensors: "
                  f"{meta['pipeline']}.from_pretrained({meta['pretrained']}).load_lora_weights({out}))")
            return 0
        print(f"exported {ck.uri} (step {ck.ref.step}, {ck.weights.upper()} weights) to {out} as a diffusers "
              f"{meta['pipeline']} ({meta['backbone_class']}{' with its LoRA adapters merged' if meta['lora'] else ''}, "
              f"text encoder {meta['text_encoder_class']}, {'the dataset VAE' if vae is not None else 'no VAE'})")
        return 0
    if is_latent(ck.cfg):
        raise ConfigError(f"{ck.uri} is a latent model (data.format=latents): the export has no place for its VAE "
                          "yet. Fix: sample it with `raydiff sample`, which decodes with the dataset's VAE")
    cfg = validate_config(apply_overrides(config_to_dict(ck.cfg, reveal_secrets=True),
                                          [o for o in args.overrides if o.startswith("sampling.")]))
    meta = export_diffusers(ck.model, cfg, ck.class_names, out, source=ck.uri, step=ck.ref.step, weights=ck.weights,
                            lora=args.lora)
    what = (f"LoRA adapters ({meta['backbone_class']}, PEFT format)" if meta["lora"] and args.lora == "adapters"
            else meta["backbone_class"] + (" with its LoRA adapters merged" if meta["lora"] else ""))
    print(f"exported {ck.uri} (step {ck.ref.step}, {ck.weights.upper()} weights) to {out}/{meta['backbone']} "
          f"({what}) and {out}/scheduler")
    return 0
