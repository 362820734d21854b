"""``raydiff train``."""

from __future__ import annotations

from orchestrator.config import load_config


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
