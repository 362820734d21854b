"""``raydiff train`` and ``raydiff sample``."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import ConfigError, load_config


def register_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a diffusion model (no arguments: the built-in dataset on local Ray)",
        description="Train with Ray Train + DeepSpeed. Overrides are key.sub=value, e.g. optim.lr=3e-4 "
        "model.name=unet-small precision.zero_stage=3. Reusing run.name resumes that run.",
    )
    p.add_argument("--config", "-c", help="job file (see jobs/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the plan, then exit")
    p.add_argument("--force", action="store_true",
                   help="take over the run's lease even while its holder looks alive (a holder you know is gone; "
                        "expired leases and dead holders on this machine are taken over without it)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from orchestrator.train.driver import dry_run_text, run_training

    if args.dry_run:
        print(dry_run_text(cfg), end="")
        return 0
    outcome = run_training(cfg, force=args.force)
    print(f"run directory: {outcome.run_uri}")
    print(f"final step: {outcome.final_step}; checkpoint: {outcome.checkpoint_path}")
    if outcome.bad_samples:
        from orchestrator.data import dropped

        kinds = ", ".join(f"{k}={v}" for k, v in sorted(outcome.bad_samples.items()))
        print(f"data: {dropped(outcome.bad_samples)} bad samples skipped ({kinds})")
    if outcome.eval is not None:
        e = outcome.eval
        print(
            f"class recognition: {e['sample_accuracy']:.1%} of {e['samples_per_class'] * e['num_classes']} "
            f"generated samples recognised as their class (chance {e['chance']:.1%}; the judge classifier "
            f"scores {e['classifier_val_accuracy']:.1%} on held-out real images)"
        )
    return 0


def register_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample a grid from a run's latest (or given) checkpoint")
    p.add_argument("--run", required=True, help="run directory URI: runs/demo or s3://bucket/runs/demo")
    p.add_argument("--out", default="samples.png", help="output PNG (local path)")
    p.add_argument("--checkpoint", help="checkpoint directory name (default: the latest)")
    p.add_argument("overrides", nargs="*", metavar="sampling.key=value",
                   help="sampling.* and data.s3.* overrides, e.g. sampling.guidance_scale=4")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    from orchestrator.train.checkpoints import list_checkpoints, load_ema_model
    from orchestrator.config import apply_overrides, parse_override, validate_config
    from orchestrator.storage import RunDir
    from orchestrator.sampling import sample_grid

    overrides = [parse_override(o) for o in args.overrides]
    bad = [k for k, _ in overrides if not k.startswith(("sampling.", "data.s3."))]
    if bad:
        raise ConfigError(f"raydiff sample accepts only sampling.* and data.s3.* overrides, got: {', '.join(bad)}")
    s3_cfg = load_config(None, [o for o in args.overrides if o.startswith("data.s3.")]).data.s3
    rundir = RunDir(args.run, s3_cfg)
    refs = list_checkpoints(rundir)
    if args.checkpoint:
        refs = [r for r in refs if r.name == args.checkpoint]
    if not refs:
        raise ConfigError(f"no checkpoint found in {args.run}" + (f" named {args.checkpoint}" if args.checkpoint else ""))
    ref = refs[-1]  # sorted by step: the latest (or the one named)
    model, cfg = load_ema_model(rundir, ref)
    cfg = validate_config(apply_overrides(cfg.model_dump(), args.overrides))
    Path(args.out).write_bytes(sample_grid(model, cfg))
    print(f"wrote {args.out} from {args.run}/{ref.name} (step {ref.step})")
    return 0
