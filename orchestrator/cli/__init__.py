"""``raydiff`` command line. Each command group lives in its own module with a ``register``
function that adds its sub-parser; this module only assembles them and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import logging
import sys

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
from orchestrator.storage import StorageError

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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


if __name__ == "__main__":
    sys.exit(main())
