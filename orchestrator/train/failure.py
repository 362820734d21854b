"""A training run that Ray Train gave up on (``run.max_failures`` restarts used up), told in one
line: which worker failed and how, and how to resume. Ray's own ``TrainingFailedError`` carries
every rank's full traceback; the CLI prints this summary instead (the traceback with --verbose)."""

from __future__ import annotations

import re
from typing import Any

_DETAIL = re.compile(r"Worker exit detail:\s*(.+)")


class TrainingFailed(RuntimeError):
    """Training stopped on a worker failure. The run keeps its checkpoints: running the same
    command again resumes from the newest one."""

    def __init__(self, message: str, *, run_uri: str, resume_step: int | None):
        super().__init__(message)
        self.run_uri = run_uri
        self.resume_step = resume_step


def _one_line(text: str, limit: int = 300) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def describe_worker_error(error: BaseException) -> str:
    """One line for one rank's failure: the exception a worker raised (type and first line), or,
    for a worker whose process died (Ray's health check found its actor gone), that and Ray's
    reason for it."""
    from ray.exceptions import RayActorError

    # Ray Train wraps a dead worker's actor error in WorkerHealthCheckFailedError (internal API).
    inner = getattr(error, "health_check_failure", None)
    if isinstance(inner, BaseException):
        error = inner
    if isinstance(error, RayActorError):
        detail = _DETAIL.search(str(error))
        # Ray's detail goes on to list common causes; its first sentence is this worker's.
        return "the worker process died" + (f" ({_one_line(detail.group(1).split('. ')[0], 200)})" if detail else "")
    first = _one_line(str(error))
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def describe_failures(worker_failures: dict[int, BaseException]) -> str:
    """Ranks that failed the same way are named together: ``rank 0, 1: ...; rank 2: ...``."""
    by_text: dict[str, list[int]] = {}
    for rank in sorted(worker_failures):
        by_text.setdefault(describe_worker_error(worker_failures[rank]), []).append(rank)
    parts = [f"rank {', '.join(map(str, ranks))}: {text}" for text, ranks in by_text.items()]
    return "; ".join(parts) or "no worker error was reported"


def training_failed(error: Any, *, run_uri: str, max_failures: int, resume_step: int | None) -> TrainingFailed:
    """The ``TrainingFailed`` for Ray Train's ``TrainingFailedError`` (a ``WorkerGroupError`` with
    each rank's exception, or a ``ControllerError``)."""
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict):
        what = describe_failures(failures)
    else:
        cause = getattr(error, "controller_failure", error)
        what = f"Ray Train's controller failed: {describe_worker_error(cause)}"
    restarts = {0: "no restart allowed", -1: "restarts unlimited"}.get(max_failures, f"after {max_failures} restarts")
    where = f"resumes from the checkpoint at step {resume_step}" if resume_step is not None else \
        "starts it again (it has no checkpoint yet)"
    return TrainingFailed(
        f"training failed ({restarts}, run.max_failures={max_failures}): {what}. The run {run_uri} keeps its "
        f"checkpoints; running the same command again {where}", run_uri=run_uri, resume_step=resume_step)
