"""Freeing the resources of Train runs whose Tune trial was stopped.

When ASHA stops a trial or PBT pauses one, Tune ends the trial's actor; the Train controller it
owns dies with it, and the workers with the controller, but the workers' placement group
belongs to the job and stays reserved. Ray Train's own ``PlacementGroupCleaner`` removes it
through the state API, which needs the dashboard; without it (raydiff's local Ray, the test
cluster) it cannot, and other trials then wait forever for those CPUs or GPUs (seen: a 4-trial
ASHA sweep stalled with 2 of 4 CPUs held by stopped trials).

So each trial's Train run registers its placement group with the controller that owns it
(``PlacementGroupTracker``, an internal Ray Train worker-group callback, the hook Ray's own
cleaner uses), and the Tune driver (``ReapPlacementGroups``) removes the groups whose controller
is gone. A run that ends normally removes its group itself; the registry then just forgets it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray import tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.util.placement_group import remove_placement_group

log = logging.getLogger("raydiff.tune")


@ray.remote(num_cpus=0)
class PlacementGroupRegistry:
    """Placement groups of live Train runs, with the controller actor that owns each."""

    def __init__(self) -> None:
        self._groups: dict[str, tuple[Any, Any]] = {}

    def add(self, pg: Any, controller: Any) -> None:
        self._groups[pg.id.hex()] = (pg, controller)

    def groups(self) -> dict[str, tuple[Any, Any]]:
        return dict(self._groups)

    def forget(self, pg_hex: str) -> None:
        self._groups.pop(pg_hex, None)


# An explicit namespace: the Train controller does not run in the driver's anonymous one.
NAMESPACE = "raydiff-tune"


def registry_name(sweep: str) -> str:
    return f"placement-groups-{sweep}"


def get_registry(sweep: str, *, create: bool = False) -> Any:
    if create:
        return PlacementGroupRegistry.options(name=registry_name(sweep), namespace=NAMESPACE,
                                              get_if_exists=True).remote()
    return ray.get_actor(registry_name(sweep), namespace=NAMESPACE)


class PlacementGroupTracker(WorkerGroupCallback):
    """Runs in the Train controller: registers each worker group's placement group."""

    def __init__(self, sweep: str):
        self.sweep = sweep

    def after_worker_group_start(self, worker_group: Any) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        controller = ray.get_runtime_context().current_actor
        ray.get(get_registry(self.sweep).add.remote(pg, controller))


def _alive(controllers: dict[str, Any], timeout_s: float) -> set[str]:
    """Keys whose actor answers (or is too busy to answer in time: assumed alive)."""
    refs = {k: a.__ray_ready__.remote() for k, a in controllers.items()}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    alive = set()
    for k, ref in refs.items():
        if ref not in done:
            alive.add(k)
            continue
        try:
            ray.get(ref)
            alive.add(k)
        except ray.exceptions.RayActorError:
            pass
    return alive


def reap(sweep: str, *, timeout_s: float = 2.0) -> int:
    """Remove the registered placement groups whose controller is dead; returns how many."""
    try:
        registry = get_registry(sweep)
    except ValueError:
        return 0  # no registry (yet): nothing registered
    groups = ray.get(registry.groups.remote())
    if not groups:
        return 0
    alive = _alive({k: c for k, (_, c) in groups.items()}, timeout_s)
    removed = 0
    for k, (pg, _) in groups.items():
        if k in alive:
            continue
        try:
            remove_placement_group(pg)
            removed += 1
        except Exception as e:  # noqa: BLE001 - already removed by Train: nothing to free
            log.debug("placement group %s: %s", k, e)
        ray.get(registry.forget.remote(k))
    return removed


class ReapPlacementGroups(tune.Callback):
    """Tune driver callback: every few seconds, and when the sweep ends, ``reap``."""

    def __init__(self, sweep: str, every_s: float = 2.0):
        self.sweep, self.every_s = sweep, every_s
        self._last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            n = reap(self.sweep)
            if n:
                log.info("freed %d placement group(s) of stopped trials", n)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        reap(self.sweep)
