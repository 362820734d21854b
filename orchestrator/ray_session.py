"""Connect to a Ray cluster or start a local one, with raydiff's logging (used by train and tune)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Iterator

from orchestrator.logs import is_verbose

# Where Ray's state API clients look first (ray/dashboard/utils.py: get_address_for_submission_client).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def init_ray(address: str | None, num_cpus: int, *, one_run: bool = False, env: dict[str, str] | None = None) -> bool:
    """Connect to ``address`` or start a local Ray with ``num_cpus`` logical CPUs, whose processes
    get ``env`` (the training workers' variables: they then need no runtime env, train/session_env.py).

    ``one_run``: a local Ray started here ends with the one training run it is for (``raydiff
    train``); that run asks no autoscaler for resources (train/scaling.py), so the autoscaling
    coordinator is not started for it. A Tune sweep's local Ray runs many trials, whose trainers
    use Ray's own scaling policy.

    Returns True when this call connected or started Ray (the caller shuts it down in
    ``finally``), False when Ray was already initialised by someone else.
    """
    import ray

    if ray.is_initialized():
        return False
    if address is not None:
        use_ray_train_settings(RAY_TRAIN_ENV)  # Ray Train hands them to its controller in a runtime env
        ray.init(address=address, log_to_driver=True)
        return True
    # Without the dashboard (CPU and memory a laptop run does not need) Ray Train's placement-group
    # cleaner cannot reach the state API and warns every few seconds; worker logs below ERROR
    # are therefore dropped unless --verbose. raydiff's own progress comes from rank 0 directly.
    verbose = is_verbose()
    use_ray_train_settings(LOCAL_RAY_TRAIN_ENV)
    with _api_server_known() as dashboard_port:
        _start_local(ray, num_cpus, verbose, dashboard_port, env)
    if not one_run:
        _start_autoscaling_coordinator()
    # Ray's LoggingConfig also sets this process's root logger to its level (ERROR): raydiff's own
    # warnings (the plan, skipped checkpoints) keep theirs.
    logging.getLogger("raydiff").setLevel(logging.INFO if verbose else logging.WARNING)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = verbose
    return True


# Ray Train settings of every run, read from the environment by the driver, which passes them to
# Ray Train's controller (values the user set win).
RAY_TRAIN_ENV = {
    # The controller polls the workers every 2 s by default and notices a finished (or failed)
    # run, or checkpoints that arrived while it waited (train/report_drain.py), only at its next
    # poll: 2.8 s from the last checkpoint to fit() returning, 0.8 s at 0.5 s (issue 18); a poll
    # is one small call per worker.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}

# Those for a Ray on this machine, also inherited by the local Ray's processes.
LOCAL_RAY_TRAIN_ENV = {
    **RAY_TRAIN_ENV,
    # Preemption (spot capacity taken back) does not happen to a Ray started on this machine;
    # Ray Train's watcher for it only logs a core_worker error about its constructor arguments.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train's own value for its controller (it passes it in a runtime env otherwise), here so
    # that the controller needs none (train/trainer.py).
    "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0",
}


@dataclass(frozen=True)
class _LocalRay:
    """What is known of a local Ray started by ``start_local_ray`` (or adopted from the sweep
    driver that started it): its session's GCS address (a later ``ray.init`` elsewhere is another
    session), the environment its processes inherited, and whether it serves Ray's state API."""

    address: str
    env: dict[str, str]
    state_api: bool


_local_ray: _LocalRay | None = None


def shutdown_in_background() -> threading.Thread:
    """``ray.shutdown()`` in a thread (join it): the caller's work that needs no Ray goes on
    meanwhile. A local Ray's shutdown is mostly waiting for its processes to end."""
    import ray

    thread = threading.Thread(target=ray.shutdown, name="raydiff-ray-shutdown", daemon=True)
    thread.start()
    return thread


def start_local_ray(env: dict[str, str] | None = None, **init_kwargs) -> None:
    """``ray.init`` of a local Ray, remembering the environment its processes start with: each of
    them inherits this process's environment at this moment, with ``env`` added (variables for
    Ray's processes only: this process's own are restored afterwards) (``local_ray_env``)."""
    global _local_ray
    import ray

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        inherited_env = dict(os.environ)
        ray.init(**init_kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # Ray's state API is served by its dashboard (include_dashboard=None: started when installed).
    _local_ray = _LocalRay(ray.get_runtime_context().gcs_address, inherited_env,
                           state_api=init_kwargs.get("include_dashboard") is not False)


def _current_local_ray() -> _LocalRay | None:
    import ray

    if _local_ray is None or not ray.is_initialized():
        return None
    return _local_ray if ray.get_runtime_context().gcs_address == _local_ray.address else None


def local_ray_env() -> dict[str, str] | None:
    """The environment every process of the current Ray session started with, when this process
    started that session with ``start_local_ray``; None otherwise (a cluster, or a Ray started
    elsewhere: what its processes inherited is not known here)."""
    local = _current_local_ray()
    return None if local is None else local.env


def state_api_served() -> bool:
    """Whether the current Ray session serves Ray's state API (its dashboard runs). False for a
    local Ray started without a dashboard (raydiff's own, ``init_ray``; the tests'), also in a
    Tune trial of a sweep that started one (``adopt_session_settings``); True otherwise (a
    cluster, a Ray started elsewhere: assumed)."""
    local = _current_local_ray()
    return local is None or local.state_api


def ray_train_settings() -> dict[str, str] | None:
    """The Ray Train settings (the variables it passes from a driver to its controller and
    workers) that the processes of this process's local Ray inherited: a Tune sweep's driver hands
    them to its trials (``adopt_session_settings``). None when this process started no local Ray."""
    env = local_ray_env()
    if env is None:
        return None
    try:
        from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE
    except ImportError:  # another Ray Train layout: the trials keep Ray's runtime env
        return None
    return {k: env[k] for k in ENV_VARS_TO_PROPAGATE if k in env}


def adopt_session_settings(settings: dict[str, str] | None, *, state_api: bool = True) -> None:
    """In a process of the session whose driver started it (a Tune trial): the Ray Train settings
    every process of the session inherited, as ``ray_train_settings`` read them there, and
    whether the session serves the state API (``state_api_served`` there)."""
    global _local_ray
    import ray

    if settings is not None and ray.is_initialized():
        _local_ray = _LocalRay(ray.get_runtime_context().gcs_address, dict(settings), state_api=state_api)


def inherited(env_vars: dict[str, str]) -> bool:
    """Whether every process of the current Ray session already has ``env_vars``, so that a runtime
    env setting them would only cost each actor a process of its own (train/session_env.py)."""
    env = local_ray_env()
    return env is not None and all(env.get(k) == v for k, v in env_vars.items())


def use_ray_train_settings(settings: dict[str, str]) -> None:
    """Apply ``settings`` (``RAY_TRAIN_ENV``, or ``LOCAL_RAY_TRAIN_ENV`` before a local Ray
    starts) to this process's environment; values the user set win."""
    for k, v in settings.items():
        os.environ.setdefault(k, v)


@contextlib.contextmanager
def _api_server_known() -> Iterator[int]:
    """A free port for the local Ray's API server, named in ``RAY_API_SERVER_ADDRESS`` while Ray's
    processes start (they inherit this process's environment; it is restored afterwards).

    Ray Train's controller starts a detached ``PlacementGroupCleaner`` actor that asks the state
    API about the controller with no address (ray/train/v2/_internal/execution/controller/
    placement_group_cleaner.py); with no ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS`` it searches
    the machine, and when another Ray instance runs there (another user's, a test's, a
    controller's head) it fails with "Found multiple active Ray instances" and prints a traceback
    into the run's output. ``RAY_ADDRESS`` would name the cluster too, but raydiff's workers read
    it as "inside a Ray Job" (cluster/rules.py), and ``ray.init`` reads it as the cluster to join."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        yield port
    finally:
        if before is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = before


def _start_autoscaling_coordinator() -> None:
    """Start the detached actor that Ray Train's controller asks for resources before it starts
    the workers (ray/train/v2/_internal/execution/scaling_policy/scaling_policy.py), now.

    The controller creates it on first use and waits for it: a new process (it inherits the
    controller's runtime env, so no idle worker fits) that imports Ray Data's autoscaler, 1.3 s on
    the path to the first step on 2 cores (issue 18). Created here it starts while the driver
    prepares the plan and the data, and the controller finds it by name. Ray's own accessor, so the
    name and options are Ray's; a Ray without it skips this (the controller then creates it)."""
    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
    except ImportError:
        return
    get_or_create_autoscaling_coordinator()


def _start_local(ray, num_cpus: int, verbose: bool, dashboard_port: int, env: dict[str, str] | None) -> None:
    start_local_ray(
        env,
        dashboard_port=dashboard_port,
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.INFO if verbose else logging.WARNING,
        logging_config=ray.LoggingConfig(log_level="INFO" if verbose else "ERROR"),
        # No job-level runtime_env (a worker_process_setup_hook, say): Ray matches worker
        # processes by runtime env, so with one every task and actor waits for a fresh process
        # (about 1.3 s each here) while the num_cpus workers Ray prestarts sit unused; without
        # one an actor starts in 0.15 s (issue 18). The processes that run raydiff's code apply
        # its filters themselves (logs.configure_worker, data/background.py).
    )
