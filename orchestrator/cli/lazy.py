"""Command handlers imported when their command runs, not when the parser is built."""

from __future__ import annotations

import argparse
import importlib
from typing import Callable


def handler(target: str) -> Callable[[argparse.Namespace], int]:
    """The function ``"package.module:function"``, imported on its first call.

    A command's implementation may import torch, diffusers or Ray (seconds); building the
    parser for any command, or `raydiff --help`, should not pay for all of them."""
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"handler target must be 'module:function', got {target!r}")

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    run.__qualname__ = run.__name__ = name
    return run
