"""``raydiff`` command line. Each command group lives in its own module with a ``register``
function that adds its sub-parser; this module only assembles them and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import gc
import logging
import re
import shlex
import sys
import traceback

from orchestrator.cli.bench import register as register_bench
from orchestrator.cli.controller import register as register_controller
from orchestrator.cli.data import register as register_data
from orchestrator.cli.submit import register as register_submit
from orchestrator.cli.eval import register as register_eval
from orchestrator.cli.export import register as register_export
from orchestrator.cli.report import register as register_report
from orchestrator.cli.sample import register as register_sample
from orchestrator.cli.train import register_train
from orchestrator.cli.tune import register as register_tune
from orchestrator.config import ConfigError
from orchestrator.data import DataError
from orchestrator.storage import LEASE_LOST_EXIT, LeaseLost, StorageError, lease_lost_line
from orchestrator.train.failure import TrainingFailed

log = logging.getLogger("raydiff")

_COMMANDS = (register_train, register_sample, register_export, register_eval, register_report, register_data, register_tune,
             register_submit, register_controller, register_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydiff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _COMMANDS:
        register(sub)
    return parser


# Override values not to repeat in a printed command (credentials given on the command line).
_SECRET_KEY = re.compile(r"(secret|token|password|session)", re.IGNORECASE)


def command_line(argv: list[str]) -> str:
    """``argv`` as a ``raydiff`` command to copy, with credential values masked."""
    words = []
    for w in argv:
        key, eq, _ = w.partition("=")
        words.append(f"{key}=..." if eq and not w.startswith("-") and _SECRET_KEY.search(key) else w)
    return shlex.join(["raydiff", *words])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `raydiff submit SPEC --follow optim.steps=9`: argparse stops collecting the overrides
        # positional at the first option; key=value words after options are overrides too.
        if hasattr(args, "overrides") and all("=" in w and not w.startswith("-") for w in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from orchestrator.logs import configure

    configure(args.verbose)  # library noise off unless --verbose; before anything starts Ray
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"raydiff: {e}", file=sys.stderr)
        return 2
    except LeaseLost as e:
        # Another process took this run's lease (--force): this one wrote nothing after that.
        print(lease_lost_line(e), file=sys.stderr)
        return LEASE_LOST_EXIT
    except TrainingFailed as e:
        # A worker failed and run.max_failures restarts are used up (train/failure.py).
        if args.verbose:
            traceback.print_exc()
        print(f"raydiff: {e}: {command_line(argv)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        # Storage and data problems found before training (StorageError, DataError) carry
        # their own fix; anything else is a bug and keeps its traceback.
        if isinstance(e, (StorageError, DataError)):
            print(f"raydiff: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("raydiff: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``raydiff`` command and ``python -m orchestrator``: ``main``, then the process exits.

    Everything the command built is about to go with the process: the interpreter's last garbage
    collection over it (torch, Ray, diffusers, the network) took 1.0 s of every command's exit on
    2 cores, 0.2 s with those objects frozen out of it (``gc.freeze``; issue 18). atexit handlers
    and thread joins run as before. Not in ``main``: a caller in the same process keeps its
    collector."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
