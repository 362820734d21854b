"""What library output reaches the user, decided in one place for the CLI and the training workers.

By default raydiff prints its own lines only: the plan, progress, checkpoints, the summary and
real warnings. Ray, Ray Data, Ray Train, DeepSpeed and torch.distributed messages that describe
their internals (execution plans, worker-group start-up, ``TrainingReport(...)`` dumps,
deprecations of calls that DeepSpeed makes, not the user) are filtered where they are made:
logger levels, ``warnings`` filters and the libraries' own environment switches (read from the
installed Ray 2.60, DeepSpeed 0.19 and torch sources). ``--verbose`` leaves everything on.

Environment switches must be set before Ray starts: a local Ray's processes inherit this
process's environment, and Ray Train passes its own ``RAY_TRAIN_*`` switches from the driver to
its controller and workers. On a cluster the training workers get them through
``worker_env`` (their runtime environment).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import logging
import os
import sys
import warnings
from typing import Iterator, Literal

ProgressMode = Literal["bar", "lines", "off"]

# (category, message regex) of warnings raised inside the libraries, about the libraries.
FILTERED_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # DeepSpeed's ZeRO calls the deprecated collectives on every step (hundreds of repeats).
    (FutureWarning, r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base"
                    r"|_reduce_scatter_base)"),
    # Ray's own internals using Ray's own deprecated options (ExecutionOptions.exclude_resources).
    (DeprecationWarning, r".*ExecutionOptions\.exclude_resources"),
)
# Module prefixes whose RayDeprecationWarnings are Ray talking to itself.
_RAY_DEPRECATION_MODULES = r"ray\..*"

# Loggers that report library internals at INFO/WARNING.
QUIET_LOGGERS: tuple[tuple[str, int], ...] = (
    ("ray.data", logging.WARNING),
    # "Progress bars disabled. To enable, ..." when raydiff turned them off on purpose.
    ("ray.data._internal.progress", logging.ERROR),
    ("ray.train", logging.WARNING),
    ("ray.tune", logging.WARNING),
    ("DeepSpeed", logging.WARNING),
    ("deepspeed", logging.WARNING),
    ("torch.distributed", logging.ERROR),
    # moto's web server (raydiff data serve-s3) logs every request at INFO.
    ("werkzeug", logging.WARNING),
    # "Found credentials in environment variables." from every process that opens S3.
    ("botocore", logging.WARNING),
)

# Environment of every process Ray starts for a quiet run.
_QUIET_ENV = {
    # Ray Data reads this for its loggers in every process that runs a dataset (the training
    # workers iterate their shards themselves).
    "RAY_DATA_LOG_LEVEL": "WARNING",
    # torch's C++ logging: the c10d "hostname of the client socket cannot be retrieved" and
    # socket-retry warnings of every rank's rendezvous.
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}
# Without a terminal: Ray's "(pid=...)" prefixes of forwarded worker lines without colour codes,
# and no "[repeated Nx across cluster]" summaries (Ray colours those unconditionally). Read when
# Ray is imported, so set before that.
_NO_COLOUR_ENV = {"RAY_COLOR_PREFIX": "0", "RAY_DEDUP_LOGS": "0"}

_verbose = False


def is_verbose() -> bool:
    return _verbose


def stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def progress_mode(enabled: bool) -> ProgressMode:
    """How training progress is shown, decided on the driver: the workers' stdout is never a
    terminal, so they are told (``bar``: a live bar; ``lines``: a plain line every
    ``logging.progress_every_s`` seconds and one per checkpoint, for files and job logs)."""
    if not enabled:
        return "off"
    return "bar" if stdout_is_terminal() else "lines"


def filter_warnings() -> None:
    for category, message in FILTERED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    try:
        from ray.util.annotations import RayDeprecationWarning
    except ImportError:  # Ray is not installed where only the model code runs
        return
    warnings.filterwarnings("ignore", category=RayDeprecationWarning, module=_RAY_DEPRECATION_MODULES)


def quiet_loggers() -> None:
    for name, level in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    # Ray Train's worker context logs every "Reporting training result ...: TrainingReport(...)"
    # at INFO on a logger named after its file, outside the "ray.train" tree. The name is the
    # file's path, found beside Ray's package: importing the module would import Ray Train and
    # Ray Data (1.2 CPU-s) into processes that use neither (the background decoder).
    try:
        import ray
    except ImportError:
        return
    context_file = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(context_file).setLevel(logging.WARNING)


def worker_env(verbose: bool) -> dict[str, str]:
    """Environment variables for Ray Train's workers (``worker_runtime_env``)."""
    return {} if verbose else dict(_QUIET_ENV)


# Ray Train's print patch sends a worker's print() to the root logger, which Ray's own logging
# set-up gives a second console handler: every raydiff line of rank 0 (progress, resume) came out
# twice. Unpatched, print() writes to the worker's stdout, which Ray forwards once. Ray Train passes
# this switch from the driver to its controller and workers.
_RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def configure(verbose: bool) -> None:
    """The CLI entry: the driver process and (through the environment) every process of a local
    Ray it starts. Idempotent."""
    global _verbose
    _verbose = verbose
    for k, v in _RAY_TRAIN_ENV.items():
        os.environ.setdefault(k, v)
    if not stdout_is_terminal():
        for k, v in _NO_COLOUR_ENV.items():
            os.environ.setdefault(k, v)
    if verbose:
        return
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)  # a user's explicit setting wins
    filter_warnings()
    quiet_loggers()


def configure_worker(verbose: bool) -> None:
    """Inside a Ray Train worker (a fresh process: the driver's filters do not reach it)."""
    global _verbose
    _verbose = verbose
    if verbose:
        return
    filter_warnings()
    quiet_loggers()


def configure_ray_process() -> None:
    """Ray's ``worker_process_setup_hook`` for a quiet local Ray: every process Ray starts (Ray
    Data's tasks and split coordinator, Ray Train's controller) gets the same filters."""
    filter_warnings()
    quiet_loggers()


RAY_SETUP_HOOK = f"{__name__}.configure_ray_process"


def ray_train_log_level(verbose: bool) -> str:
    """Ray Train's own ``LoggingConfig(log_level)``: its controller and workers log worker-group
    start-up and every ``TrainingReport(...)`` at INFO."""
    return "INFO" if verbose else "WARNING"


@contextlib.contextmanager
def library_prints(verbose: bool) -> Iterator[None]:
    """Hold back what a library ``print``s to stdout inside the block (DeepSpeed announces its
    JIT-built ops that way), logging it at DEBUG instead (a Ray worker's root logger shows INFO);
    errors still raise. ``print`` itself is swapped too: Ray Train's patched print (when enabled)
    logs instead of writing."""
    if verbose:
        yield
        return
    buf = io.StringIO()
    current = builtins.print

    def held(*objects: object, sep: str | None = " ", end: str | None = "\n", file=None, flush: bool = False) -> None:
        if file is None or file is sys.stdout:
            buf.write((sep if sep is not None else " ").join(map(str, objects)) + (end if end is not None else "\n"))
        else:
            current(*objects, sep=sep, end=end, file=file, flush=flush)

    builtins.print = held
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        builtins.print = current
        text = buf.getvalue().strip()
        if text:
            logging.getLogger("raydiff.libraries").debug("%s", text)
