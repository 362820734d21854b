"""``raydiff sample``: images from a checkpoint, as one grid PNG and/or one PNG per image."""

from __future__ import annotations

import argparse
import io
from typing import TYPE_CHECKING, get_args

from orchestrator.config import ConfigError, SamplePrecision, apply_overrides, config_to_dict, load_config, parse_override, validate_config
from orchestrator.storage import join, write_bytes

if TYPE_CHECKING:
    import torch

SAMPLE_OVERRIDES = ("sampling.", "storage.s3.")


def add_precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=get_args(SamplePrecision),
                   help="the network's precision (sampling.precision; default auto: bf16 where the CPU or GPU "
                        "has it natively, else fp16 on a GPU, fp32 on a CPU)")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """``--checkpoint``/``--raw`` and the storage.s3.* overrides, shared by sample, export and eval."""
    p.add_argument("--checkpoint", help="a run directory (its latest checkpoint) or one checkpoint directory, "
                   "local or s3://; with --run: a checkpoint directory name inside that run")
    p.add_argument("--raw", action="store_true",
                   help="use the DeepSpeed model weights instead of the EMA weights (the default)")


def register(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="sample images from a checkpoint (EMA weights) as a grid or single PNGs",
        description="Sample from a checkpoint. Without options this redraws the training grid of the "
        "checkpoint (one row per class, sampling.* settings of the run). Options override the run's "
        "sampling settings; key=value overrides (sampling.*, storage.s3.*) work too.",
    )
    add_checkpoint_args(p)
    p.add_argument("--run", help="alias of --checkpoint for a run directory (kept for older commands)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"))
    p.add_argument("--steps", type=int, help="number of sampling steps")
    p.add_argument("--eta", type=float, help="DDIM noise scale (0 = deterministic; DDPM is always 1)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (1 = conditional model only)")
    p.add_argument("--labels", help="classes to draw, as indices or class names: 0,3,7 or red-circle,7 "
                   "(default: one row per class)")
    p.add_argument("--num", type=int, help="images per class (unconditional models: images in total)")
    p.add_argument("--seed", type=int, help="random seed (default: the run's sampling.seed)")
    p.add_argument("--out", help="grid PNG (local or s3://; default samples.png when --out-dir is not given)")
    p.add_argument("--out-dir", help="directory for one PNG per image, named NNNNN_<class>.png")
    p.add_argument("--batch-size", type=int, help="images per sampler batch (default: all at once); "
                   "batch i uses seed+i, so the batch size is part of what fixes the images")
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N")
    add_precision_arg(p)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="sampling.* and storage.s3.* overrides, e.g. sampling.guidance_scale=4")
    p.set_defaults(func=cmd_sample)


def s3_from_overrides(overrides: list[str], allowed: tuple[str, ...], command: str):
    """Validate the key=value overrides a non-training command accepts; returns storage.s3 settings."""
    bad = [k for k, _ in (parse_override(o) for o in overrides) if not k.startswith(allowed)]
    if bad:
        kinds = " and ".join(f"{a}*" for a in allowed)
        raise ConfigError(f"raydiff {command} accepts only {kinds} overrides, got: {', '.join(bad)}")
    return load_config(None, [o for o in overrides if o.startswith("storage.s3.")]).storage.s3


def checkpoint_uri(args) -> tuple[str, str | None]:
    """(URI, checkpoint name inside it or None) from --checkpoint / --run."""
    run = getattr(args, "run", None)
    if run and args.checkpoint:
        if "/" in args.checkpoint or "://" in args.checkpoint:
            raise ConfigError("--run and --checkpoint together: --checkpoint must be a checkpoint directory name "
                              "inside the run (e.g. checkpoint_00000600). Fix: give only --checkpoint URI")
        return run, args.checkpoint
    uri = args.checkpoint or run
    if not uri:
        raise ConfigError(f"raydiff {args.command}: no checkpoint given. Fix: --checkpoint runs/demo "
                          "(a run directory or one of its checkpoint_* directories)")
    return uri, None


def sampling_config(cfg, overrides: list[str], args):
    """The run's config with the sampling.* / storage.s3.* overrides, then the command-line options, applied."""
    flags = {"sampler": args.sampler, "num_steps": args.steps, "eta": args.eta,
             "guidance_scale": args.guidance, "seed": args.seed, "precision": args.precision}
    extra = [f"sampling.{k}={v}" for k, v in flags.items() if v is not None]
    out = validate_config(apply_overrides(config_to_dict(cfg, reveal_secrets=True), [*overrides, *extra]))
    if args.eta is not None and out.sampling.sampler == "ddpm" and args.eta != 1.0:
        raise ConfigError(f"--eta {args.eta} with the DDPM sampler: ancestral DDPM always has eta 1. "
                          "Fix: --sampler ddim, or drop --eta")
    return out


def image_png(image: torch.Tensor) -> bytes:
    from PIL import Image

    from orchestrator.sampling import to_uint8

    arr = to_uint8(image[None])[0]
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def cmd_sample(args) -> int:
    # Imported here, not at module level: building the parser of every command skips torch.
    import torch

    from model.conditioning import class_conditioning
    from orchestrator.eval.generate import generate_batched, pick_device
    from orchestrator.eval.loading import load_checkpoint, parse_labels
    from orchestrator.sampling import grid_png, is_latent

    s3 = s3_from_overrides(args.overrides, SAMPLE_OVERRIDES, "sample")
    for name in ("num", "steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be a positive integer")
    uri, name = checkpoint_uri(args)
    ck = load_checkpoint(uri, s3, raw=args.raw, name=name)
    cfg = sampling_config(ck.cfg, args.overrides, args)
    scfg = cfg.sampling
    per = args.num or scfg.per_class
    if ck.num_classes is None:
        if args.labels:
            parse_labels(args.labels, None, None)  # raises with the fix
        labels, columns = None, min(per, scfg.per_class)
    else:
        classes = (parse_labels(args.labels, ck.num_classes, ck.class_names) if args.labels
                   else list(range(min(ck.num_classes, scfg.max_rows))))
        labels, columns = torch.tensor(classes).repeat_interleave(per), per
    num = per if labels is None else len(labels)
    cond = class_conditioning(labels, ck.num_classes)
    images = generate_batched(ck.model, cfg, cond, num, seed=scfg.seed, batch_size=args.batch_size,
                              device=pick_device(args.device), desc=f"{scfg.sampler} {scfg.num_steps} steps")
    if is_latent(cfg):
        from orchestrator.data.vae import latents_to_images

        # The VAE recorded with the latent dataset decodes them (latent channels 0-2 where it is
        # not on this machine; a warning says so).
        images = latents_to_images(images, cfg.data, device=pick_device(args.device))
    written = []
    if args.out_dir:
        for i in range(num):
            tag = ""
            if labels is not None:
                c = int(labels[i])
                tag = "_" + (ck.class_names[c] if ck.class_names else f"class{c}")
            write_bytes(join(args.out_dir, f"{i:05d}{tag}.png"), image_png(images[i]), s3)
        written.append(f"{num} images in {args.out_dir}")
    if args.out or not args.out_dir:
        out = args.out or "samples.png"
        write_bytes(out, grid_png(images, columns), s3)
        written.append(out)
    print(f"wrote {' and '.join(written)} from {ck.uri} (step {ck.ref.step}, {ck.weights.upper()} weights, "
          f"{scfg.sampler} {scfg.num_steps} steps, guidance {scfg.guidance_scale:g}, seed {scfg.seed})")
    return 0
