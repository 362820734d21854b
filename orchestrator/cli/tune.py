"""``raydiff tune``: a hyperparameter sweep over full training runs (Ray Tune)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="hyperparameter search: every trial a full training run (Ray Tune over Ray Train)",
        description="Run the sweep in a job file's tune: section (see jobs/tune-*.yaml). Overrides are "
        "key.sub=value for training and tune keys, e.g. optim.steps=300 tune.num_samples=16. Running the "
        "same command again resumes the sweep: finished trials are kept, unfinished ones continue from "
        "their checkpoints.",
    )
    p.add_argument("--config", "-c", required=True, help="sweep job file with a tune: section")
    p.add_argument("--dry-run", action="store_true", help="validate, print the search space and settings, then exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from orchestrator.tune.config import load_tune_config
    from orchestrator.tune.runner import describe, run_sweep

    job = load_tune_config(args.config, args.overrides)
    if args.dry_run:
        print(describe(job))
        return 0
    out = run_sweep(job)
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(out.table.to_string(index=False))
    print(f"results: {out.csv_uri}")
    if out.png_uri:
        print(f"plot: {out.png_uri}")
    if out.best_uri:
        print(f"best configuration: {out.best_uri}  (raydiff train --config {out.best_uri})")
    errors = int((out.table["status"] == "error").sum()) if len(out.table) else 0
    return 1 if errors and errors == len(out.table) else 0
