"""Command-line flags for object-store settings, shared by ``raydiff data`` and ``raydiff bench data``.

S3 settings come from ``--endpoint-url/--region/--profile`` and the standard AWS environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``). There are deliberately no credential flags:
secrets on a command line end up in shell history and ``ps`` output.
"""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.config import S3Config


def s3_config_from_args(args: argparse.Namespace) -> S3Config:
    """An ``S3Config`` from the flags that ``add_s3_args`` defines (unset flags: defaults)."""
    kw: dict[str, Any] = {}
    if getattr(args, "endpoint_url", None):
        kw["endpoint_url"] = args.endpoint_url
    if getattr(args, "region", None):
        kw["region"] = args.region
    if getattr(args, "profile", None):
        kw["profile"] = args.profile
    return S3Config(**kw)


def add_s3_args(p: argparse.ArgumentParser) -> None:
    """``--endpoint-url``, ``--region``, ``--profile`` (no credential flags, see above)."""
    g = p.add_argument_group("S3 (credentials: AWS_* environment variables or --profile)")
    g.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    g.add_argument("--region")
    g.add_argument("--profile", help="AWS profile name from ~/.aws/config")
