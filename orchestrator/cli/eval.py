"""``raydiff eval``: FID and KID of a checkpoint over sampler step counts and guidance scales.

For every (steps, guidance) pair the same ``--num`` labels and seeds are sampled (common random
numbers: differences between settings are not sampling noise of the initial draws), featurised
and compared with the reference images. The table is printed and written as JSON into the run
directory (``eval_fid.json``).
"""

from __future__ import annotations

import json
import time

from orchestrator.cli.sample import SAMPLE_OVERRIDES, add_checkpoint_args, add_precision_arg, checkpoint_uri, s3_from_overrides
from orchestrator.config import ConfigError, apply_overrides, config_to_dict, validate_config

EVAL_FILE = "eval_fid.json"


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="FID and KID of a checkpoint against reference images, over DDIM steps and guidance scales",
        description="Generate --num images per (steps, guidance) setting, compute FID and KID against the "
        "reference images and write the table to eval_fid.json in the run directory. Features: a CNN "
        "trained on half of the labelled reference images (reported as 'ref-cnn features'), or the "
        "Inception-v3 of --inception PATH.",
    )
    add_checkpoint_args(p)
    p.add_argument("--reference", help="reference images: a data source (image folder, WebDataset, Parquet; "
                   "local or s3://) or builtin (default: the run's training data)")
    p.add_argument("--num", type=int, default=1000, help="generated images per setting (default 1000)")
    p.add_argument("--steps", default="10,20,50", help="sampler step counts, comma-separated")
    p.add_argument("--guidance", default="1,2,4", help="guidance scales, comma-separated")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), help="default: the run's sampling.sampler")
    p.add_argument("--eta", type=float, help="DDIM eta (default: the run's sampling.eta)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250, help="images per sampler batch")
    p.add_argument("--reference-limit", type=int, default=10_000, help="at most this many reference images")
    p.add_argument("--inception", metavar="PATH", help="NVIDIA's TorchScript inception-2015-12-05.pt for "
                   "Inception features (nothing is downloaded)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N")
    add_precision_arg(p)
    p.add_argument("--output", default=EVAL_FILE, help=f"file name in the run directory (default {EVAL_FILE})")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="sampling.* and storage.s3.* overrides")
    p.set_defaults(func=cmd_eval)


def _numbers(text: str, kind, what: str, lowest: float) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what} {text!r}: expected comma-separated numbers, e.g. --{what} 10,20,50") from None
    if not values or any(v < lowest for v in values):
        raise ConfigError(f"--{what} {text!r}: give one or more values >= {lowest:g}")
    return list(dict.fromkeys(values))


def _features(args, ref, device):
    import torch

    from orchestrator.eval.features import CNNFeatures, InceptionFeatures

    if args.inception:
        return InceptionFeatures(args.inception, device), ref.images
    if ref.labels is None:
        raise ConfigError(f"--reference {ref.source} has no class labels, and the stand-in feature network is a "
                          "classifier trained on labelled reference images. Fix: pass --inception PATH")
    # The CNN learns on one half; the reference statistics come from the other half, which it has
    # not seen, like the generated images.
    perm = torch.randperm(len(ref.images), generator=torch.Generator().manual_seed(args.seed))
    half = len(perm) // 2
    feats = CNNFeatures.train(ref.images[perm[:half]], ref.labels[perm[:half]], len(ref.class_names),
                              seed=args.seed, device=device)
    return feats, ref.images[perm[half:]]


def cmd_eval(args) -> int:
    import torch

    from model.conditioning import class_conditioning
    from orchestrator.eval.features import metric_label
    from orchestrator.eval.fid import fid_from_features, kernel_inception_distance
    from orchestrator.eval.generate import generate_batched, pick_device
    from orchestrator.eval.loading import load_checkpoint
    from orchestrator.eval.reference import load_reference, reference_data_config
    from orchestrator.sampling import is_latent

    for name in ("num", "batch_size", "reference_limit", "kid_subsets", "kid_subset_size"):
        if getattr(args, name) < (2 if name in ("num", "kid_subset_size") else 1):
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} is too small")
    steps_list = _numbers(args.steps, int, "steps", 1)
    guidance_list = _numbers(args.guidance, float, "guidance", 0)
    s3 = s3_from_overrides(args.overrides, SAMPLE_OVERRIDES, "eval")
    uri, name = checkpoint_uri(args)
    ck = load_checkpoint(uri, s3, raw=args.raw, name=name)
    if is_latent(ck.cfg):
        raise ConfigError(f"{ck.uri} is a latent model (data.format=latents): FID/KID would need decoded images and "
                          "a reference image set, which raydiff eval does not handle for latent runs yet")
    flags = [f"sampling.{k}={v}" for k, v in (("sampler", args.sampler), ("eta", args.eta),
                                               ("precision", args.precision)) if v is not None]
    cfg = validate_config(apply_overrides(config_to_dict(ck.cfg, reveal_secrets=True), [*args.overrides, *flags]))
    if args.eta is not None and cfg.sampling.sampler == "ddpm" and args.eta != 1.0:
        raise ConfigError(f"--eta {args.eta} with the DDPM sampler: ancestral DDPM always has eta 1. "
                          "Fix: --sampler ddim, or drop --eta")
    device = pick_device(args.device)

    ref = load_reference(reference_data_config(cfg.data, args.reference), limit=args.reference_limit, seed=args.seed)
    feats, ref_images = _features(args, ref, device)
    ref_feats = feats(ref_images)
    if ck.num_classes is None:
        cond = None
        if guidance_list != [1.0]:
            print("unconditional model: guidance does not apply, evaluating guidance 1 only")
        guidance_list = [1.0]
    else:
        cond = class_conditioning(torch.arange(args.num) % ck.num_classes, ck.num_classes)  # every class equally often

    fid_name, kid_name = metric_label("FID", feats), metric_label("KID", feats)
    print(f"{fid_name} / {kid_name}: {ck.uri} (step {ck.ref.step}, {ck.weights.upper()} weights), "
          f"{args.num} samples per setting vs {len(ref_images)} reference images from {ref.source}")
    print(f"features: {feats.describe()}")
    print(f"{'steps':>5} {'guidance':>8} {'FID':>10} {'KID x1e3':>10} {'± std':>8} {'seconds':>8}", flush=True)
    rows = []
    for steps in steps_list:
        for w in guidance_list:
            scfg = cfg.sampling.model_copy(update={"num_steps": steps, "guidance_scale": w})
            t0 = time.perf_counter()
            images = generate_batched(ck.model, cfg, cond, args.num, seed=args.seed, batch_size=args.batch_size,
                                      device=device, scfg=scfg, desc=f"steps {steps} guidance {w:g}")
            f = feats(images)
            kid = kernel_inception_distance(f, ref_feats, subsets=args.kid_subsets,
                                            subset_size=args.kid_subset_size, seed=args.seed)
            row = {"steps": steps, "guidance": w, "fid": fid_from_features(f, ref_feats), "kid": kid.mean,
                   "kid_std": kid.std, "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            print(f"{steps:>5} {w:>8g} {row['fid']:>10.3f} {kid.mean * 1e3:>10.3f} {kid.std * 1e3:>8.3f} "
                  f"{row['seconds']:>8.1f}", flush=True)
    report = {
        "checkpoint": ck.uri,
        "step": ck.ref.step,
        "weights": ck.weights,
        "features": {"name": feats.name, "dim": feats.dim, "description": feats.describe()},
        "metrics": {"fid": fid_name, "kid": kid_name},
        "reference": {"source": ref.source, "num": len(ref_images), "skipped": ref.skipped},
        "num_samples": args.num,
        "sampler": cfg.sampling.sampler,
        "eta": cfg.sampling.eta if cfg.sampling.sampler == "ddim" else 1.0,
        "spacing": cfg.sampling.spacing,
        "seed": args.seed,
        "kid": {"subsets": args.kid_subsets, "subset_size": min(args.kid_subset_size, args.num, len(ref_images))},
        "results": rows,
    }
    written = ck.run.write_text(args.output, json.dumps(report, indent=2) + "\n")
    print(f"wrote {written}")
    return 0
