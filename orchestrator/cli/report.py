"""``raydiff report RUN``: one PNG of a run's curves and newest samples (orchestrator/report.py)."""

from __future__ import annotations

from orchestrator.cli.sample import s3_from_overrides


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write one PNG with a run's loss curves, throughput, loss scale, learning rate and newest samples",
        description="Reads RUN/metrics.jsonl and RUN/samples/ (local or s3://) and writes RUN/report.png, "
        "or --out PATH.",
    )
    p.add_argument("run", metavar="RUN", help="run directory: {run.storage}/{run.name}, local or s3://")
    p.add_argument("--out", metavar="PATH", help="where to write the PNG (local or s3://); default RUN/report.png")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="storage.s3.* settings for an s3:// RUN")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from orchestrator.report import write_report

    s3 = s3_from_overrides(args.overrides, ("storage.s3.",), "report")
    dest, report = write_report(args.run, s3, args.out)
    empty = [name for name in report.boxes if name not in report.filled]
    print(f"report written to {dest}" + (f" (no data for: {', '.join(empty)})" if empty else ""))
    return 0
