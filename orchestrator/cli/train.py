"""``raydiff train``."""

from __future__ import annotations

import argparse

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
    # SUPPRESS: without the flag here, `raydiff -v train` keeps the top-level value.
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Ray, Ray Data, DeepSpeed and torch messages and warnings (hidden by default)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from orchestrator.train.driver import dry_run_text, run_training

    if args.dry_run:
        print(dry_run_text(cfg), end="")
        return 0
    outcome = run_training(cfg, force=args.force)
    from orchestrator.train.status import summary_lines

    if outcome.already_complete:
        print(f"raydiff: run {outcome.run_uri} is already complete at step {outcome.final_step} "
              f"(optim.steps={cfg.optim.steps}): nothing to train. To train further, raise optim.steps "
              f"(e.g. optim.steps={2 * max(outcome.final_step, 1)}); for a new run, set run.name")
    for line in summary_lines(outcome.run_uri, outcome.final_step, outcome.checkpoint_path, outcome.eval,
                              outcome.bad_samples, cfg.storage.s3):
        print(line)
    return 0
