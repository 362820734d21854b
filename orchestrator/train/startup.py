"""Time to first step, by phase: where the seconds before training go.

Every resume, every restarted worker group and every Tune trial pays the start-up again, so it
is measured on every run (issue 11 asks for it on the GPU). The driver and rank 0 append one
``phase`` event to ``events.jsonl`` as each stage ends; ``startup_breakdown`` turns the newest
invocation's events into durations, and the end-of-run summary prints them.
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Literal, get_args

# In the order they happen. ray: config, storage and data checks, the run lease, Ray started or
# connected; data: listing, the decoded cache and the validation images; workers: Ray Train's
# worker group up (process start, torch import, process group); engine: network, DeepSpeed
# engine and EMA built; restore: checkpoint chosen and loaded; first_step: the first optimizer
# step, with its data wait and (compiled models) compilation.
Phase = Literal["ray", "data", "workers", "engine", "restore", "first_step"]
PHASES: tuple[Phase, ...] = get_args(Phase)


def phase_event(phase: Phase, at: float | None = None) -> dict[str, Any]:
    return {"event": "phase", "phase": phase, "time": time.time() if at is None else at}


def startup_breakdown(events: Iterable[dict[str, Any]]) -> list[tuple[Phase, float]]:
    """Seconds spent in each phase of the newest invocation (from its ``started`` event).

    A phase's duration runs from the end of the phase before it. After a worker-group restart
    the phases repeat; the first occurrence after ``started`` is the one the user waited for.
    Phases without an event (a run killed during start-up) are left out.
    """
    start: float | None = None
    ends: dict[str, float] = {}
    for e in events:
        if e.get("event") == "started":
            start, ends = float(e["time"]), {}
        elif start is not None:
            name = "first_step" if e.get("event") == "first_step" else e.get("phase") if e.get("event") == "phase" else None
            if name in PHASES and name not in ends:
                ends[name] = float(e["time"])
    out: list[tuple[Phase, float]] = []
    prev = start
    for name in PHASES:
        if name in ends and prev is not None:
            out.append((name, max(0.0, ends[name] - prev)))
            prev = ends[name]
    return out


def startup_line(events: Iterable[dict[str, Any]]) -> str | None:
    parts = startup_breakdown(events)
    if not parts or parts[-1][0] != "first_step":
        return None
    total = sum(s for _, s in parts)
    detail = ", ".join(f"{name.replace('_', ' ')} {s:.1f} s" for name, s in parts)
    return f"time to first step: {total:.1f} s ({detail})"


def time_to_first_step(events: Iterable[dict[str, Any]]) -> float | None:
    """Seconds from the start of the newest invocation that stepped to its first step (a Tune
    trial's start-up), or None when none has. Invocations that trained nothing are passed over:
    one killed while starting, or one that resumed at the last step (a run whose driver died after
    its last checkpoint but before recording its end runs again to evaluate and finish)."""
    events = list(events)
    starts = [i for i, e in enumerate(events) if e.get("event") == "started"]
    for begin, end in zip(reversed(starts), [None, *reversed(starts)]):
        parts = startup_breakdown(events[begin:end])
        if parts and parts[-1][0] == "first_step":
            return sum(s for _, s in parts)
    return None


def first_step_after(events: Iterable[dict[str, Any]], since: float, until: float | None = None) -> float | None:
    """When the run first stepped at or after ``since`` (and before ``until``): for a controller
    attempt submitted at ``since``, when training ran again."""
    for e in events:
        if e.get("event") == "first_step":
            at = float(e["time"])
            if at >= since and (until is None or at < until):
                return at
    return None

