"""Bad-sample counts: a named Ray actor that decode tasks add to and the driver and the trainer
read (``bad_sample_counts``), so that skipped samples show up in the run's metrics.

The first task with something to count creates the actor: a run whose data has no bad sample (most
runs) never starts its process (about 0.9 CPU-s per run on this project's 2-core machine, issue
18). Created by a task, it is detached (a task's actor would otherwise end with the worker process
that made it); the run's owner ends it with ``release_counter`` when it has read the counts, and
ends one left by a killed earlier invocation of the same run when it starts again."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

COUNTER_NAMESPACE = "raydiff"

_COUNTERS: dict[str, Any] = {}


def _counter_cls():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class BadSampleCounter:
        def __init__(self) -> None:
            self.counts: dict[str, int] = {}

        def add(self, counts: dict[str, int]) -> None:
            for k, v in counts.items():
                self.counts[k] = self.counts.get(k, 0) + int(v)

        def get(self) -> dict[str, int]:
            return dict(self.counts)

    return BadSampleCounter


def counter(name: str, create: bool):
    """The actor handle for ``name`` (created when ``create``), or None."""
    import ray

    if name in _COUNTERS:
        return _COUNTERS[name]
    try:
        h = ray.get_actor(name, namespace=COUNTER_NAMESPACE)
    except ValueError:
        if not create:
            return None
        # A fixed namespace: the driver, Tune trials and Train workers may run in different
        # namespaces but must find the same counter.
        h = _counter_cls().options(name=name, namespace=COUNTER_NAMESPACE, get_if_exists=True,
                                   lifetime="detached").remote()
    _COUNTERS[name] = h
    return h


def release_counter(name: str) -> None:
    """End the counter ``name`` (its owner calls it once the counts are read): a named actor lives
    as long as its owner's Ray connection, and a Ray session that outlives the run (a Tune sweep's
    trials, a notebook, the test suite's shared Ray) would otherwise keep an idle process per run,
    each about 0.8% of a core on the 2-core machine (issue 18)."""
    import ray

    h = counter(name, create=False) if ray.is_initialized() else None
    _COUNTERS.pop(name, None)
    if h is not None:
        ray.kill(h)


def bad_sample_counts(counter_name: str) -> dict[str, int]:
    """Counts per kind recorded by pipelines built with ``counter_name`` ({} if none).

    Kinds starting with ``converted_from_`` are kept samples whose pixel mode was converted, and
    ``retried_read`` counts object-store reads retried after a transient error (throttling, 5xx,
    timeouts); all other kinds are dropped samples (``dropped(counts)`` sums them).
    """
    import ray

    h = counter(counter_name, create=False)
    if h is None:
        return {}
    try:
        return ray.get(h.get.remote())
    except ray.exceptions.RayActorError:
        _COUNTERS.pop(counter_name, None)
        return {}


def report(counts: dict[str, int], counter_name: str | None) -> None:
    """Add one task's counts to the named counter (or log them when there is none)."""
    if not counts:
        return
    if counter_name is None:
        log.warning("dropped/converted samples in one batch: %s", counts)
        return
    import ray

    # Waited for: bad samples are rare, and the counts must be complete when an epoch ends.
    try:
        ray.get(counter(counter_name, create=True).add.remote(counts))
    except ray.exceptions.RayActorError:
        # A handle this process kept from an earlier run of the same name, whose owner has
        # ended that counter since: this run's is a new one.
        _COUNTERS.pop(counter_name, None)
        ray.get(counter(counter_name, create=True).add.remote(counts))
