"""Ray Train's controller and workers without runtime envs, where the Ray session's processes
already have every variable those would set.

Ray Train 2.60 hands its settings (``RAY_TRAIN_*`` variables) to its controller in a runtime env,
and the workers get those plus ``RunConfig(worker_runtime_env=...)`` in one. Ray starts every
actor that has a runtime env through a set-up process of its own (0.4 CPU-s on this project's
2-core machine) and never on one of the idle workers it prestarts; the controller's helper
actors (synchronization actor, placement-group cleaner) inherit its runtime env. A local Ray
that raydiff (or the test suite) starts with those variables already in its environment
(ray_session.start_local_ray) needs none of them (issue 18). Elsewhere (a cluster, a Ray started
by someone else, a variable changed after Ray started) Ray's own way is kept.

A module of its own, free of torch: the controller process unpickles these classes.
"""

from __future__ import annotations

import os

try:
    from ray._common.constants import RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR
    from ray.train.v2._internal.constants import (DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
                                                  get_env_vars_to_propagate)
    from ray.train.v2._internal.execution.worker_group import WorkerGroup

    from orchestrator.train.report_drain import ReportDrainingController
except ImportError:  # another Ray Train layout: its controller and workers keep their runtime envs
    ReportDrainingController = WorkerGroup = None


def controller_env() -> dict[str, str] | None:
    """The environment variables Ray Train 2.60 gives its controller (and, through it, the
    workers) in a runtime env (``DataParallelTrainer._initialize_and_run_controller``)."""
    if ReportDrainingController is None:
        return None
    env = get_env_vars_to_propagate()
    env.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR, DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    return env


if ReportDrainingController is not None:
    class SessionEnvWorkerGroup(WorkerGroup):
        """Ray Train's worker group, minus the workers' runtime env when it would only set
        variables this process (the controller) already has with the same values: the workers
        then inherit them as it did."""

        @staticmethod
        def _get_worker_runtime_env(custom_runtime_env):
            env = WorkerGroup._get_worker_runtime_env(custom_runtime_env)
            if set(env) == {"env_vars"} and all(os.environ.get(k) == v for k, v in env["env_vars"].items()):
                return None
            return env

    class SessionEnvController(ReportDrainingController):
        """Ray Train's controller (draining reports: train/report_drain.py), started without a
        runtime env (train/trainer.py), whose worker group gives its workers none where none is
        needed."""

        worker_group_cls = SessionEnvWorkerGroup
else:
    SessionEnvController = SessionEnvWorkerGroup = None
