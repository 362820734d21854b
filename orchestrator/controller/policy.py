"""Whose fault a failed Ray Job is, and how long to wait before trying again.

The user's (not retried, the reason is shown): raydiff's command line exits with code 2 for a
``ConfigError``, ``StorageError`` or ``DataError`` (invalid config, data that does not exist,
unusable storage, a run whose lease another live run holds) and for usage errors; an entrypoint
that cannot import raydiff or has a syntax error; a runtime environment Ray cannot build from the
spec (the same spec would fail the same way).

Infrastructure's (retried with backoff, up to ``max_restarts``): a driver killed by a signal
(``kill -9``, the OOM killer: a negative exit code, or 128+N through the shell), a driver lost
with its node or its job supervisor, any other non-zero exit (Ray Train giving up after its own
worker restarts, a crash in the driver), and a job the cluster no longer knows (a head restarted
without its job table).
"""

from __future__ import annotations

import random
import re
import signal
from dataclasses import dataclass
from typing import Any, Literal

# raydiff's CLI exit code for errors in the user's input (orchestrator/cli/__init__.py); also
# argparse's and the Python interpreter's for usage errors and missing script files.
USER_EXIT_CODE = 2
_IMPORT_ERRORS = ("ModuleNotFoundError", "ImportError", "SyntaxError", "IndentationError")
_SUPERVISOR_ERRORS = ("JOB_SUPERVISOR_ACTOR_START_TIMEOUT", "JOB_SUPERVISOR_ACTOR_START_FAILURE",
                      "JOB_SUPERVISOR_ACTOR_UNSCHEDULABLE", "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE",
                      "JOB_SUPERVISOR_ACTOR_DIED", "JOB_ENTRYPOINT_COMMAND_START_ERROR")
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): ?(.*)$")


@dataclass(frozen=True)
class Verdict:
    kind: Literal["user", "infra"]
    reason: str

    @property
    def retry(self) -> bool:
        return self.kind == "infra"


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _last_line(text: str, prefix: str) -> str | None:
    for line in reversed(text.splitlines()):
        if line.strip().startswith(prefix):
            return line.strip()
    return None


def _last_exception(text: str) -> tuple[str, str] | None:
    for line in reversed(text.splitlines()):
        m = _EXC_LINE.match(line.strip())
        if m:
            return m.group(1), m.group(2)
    return None


def _short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def classify(info: Any, logs: str = "") -> Verdict:
    """The verdict on a FAILED job from its ``JobInfo`` (``error_type``, ``driver_exit_code``,
    ``message``) and the tail of its logs (Ray puts the last lines in ``message`` too)."""
    error_type = str(getattr(getattr(info, "error_type", None), "value", getattr(info, "error_type", None)) or "")
    code = getattr(info, "driver_exit_code", None)
    message = getattr(info, "message", None) or ""
    text = f"{message}\n{logs}"

    if error_type == "RUNTIME_ENV_SETUP_FAILURE":
        return Verdict("user", f"Ray could not set up the job's runtime environment: {_short(message)}")
    if error_type in _SUPERVISOR_ERRORS:
        return Verdict("infra", f"Ray lost the job's driver ({error_type}): {_short(message)}")
    if code is None:
        # FAILED without an exit code: the driver never reported one (its node or supervisor died).
        return Verdict("infra", f"the driver was lost: {_short(message) or 'no exit code and no message'}")
    if code < 0 or code > 128:
        sig = -code if code < 0 else code - 128
        return Verdict("infra", f"the driver was killed by {_signal_name(sig)} (exit code {code})")
    if code == USER_EXIT_CODE:
        said = _last_line(text, "raydiff: ")
        return Verdict("user", said or f"exit code {code} (raydiff's code for configuration, storage and data errors): "
                                       f"{_short(message)}")
    exc = _last_exception(text)
    if exc is not None and exc[0].rsplit(".", 1)[-1] in _IMPORT_ERRORS:
        return Verdict("user", f"the entrypoint cannot be imported: {exc[0]}: {_short(exc[1], 200)}")
    if exc is not None:
        return Verdict("infra", f"the driver failed with exit code {code}: {exc[0]}: {_short(exc[1], 200)}")
    # A run whose workers failed past run.max_failures says so in one line (train/failure.py).
    said = _last_line(text, "raydiff: ")
    return Verdict("infra", f"the driver failed with exit code {code}" + (f": {_short(said, 400)}" if said else ""))


def backoff_s(failures: int, *, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Wait before attempt ``failures + 1``: exponential in the consecutive failures, capped,
    with jitter in [50%, 100%] so that jobs failed by one event do not all return at once."""
    if failures < 1:
        return 0.0
    delay = min(cap_s, base_s * 2 ** min(failures - 1, 30))
    return delay * (0.5 + 0.5 * (rng or random).random())
