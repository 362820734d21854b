"""Connect to a Ray cluster or start a local one, with raydiff's logging (used by train and tune)."""

from __future__ import annotations

import logging
import os

from orchestrator.logs import RAY_SETUP_HOOK, is_verbose


def init_ray(address: str | None, num_cpus: int) -> bool:
    """Connect to ``address`` or start a local Ray with ``num_cpus`` logical CPUs.

    Returns True when this call connected or started Ray (the caller shuts it down in
    ``finally``), False when Ray was already initialised by someone else.
    """
    import ray

    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, log_to_driver=True)
        return True
    # Without the dashboard (CPU and memory a laptop run does not need) Ray Train's placement-group
    # cleaner cannot reach the state API and warns every few seconds; worker logs below ERROR
    # are therefore dropped unless --verbose. raydiff's own progress comes from rank 0 directly.
    verbose = is_verbose()
    # Preemption (spot capacity taken back) does not happen to a Ray started on this machine;
    # Ray Train's watcher for it only logs a core_worker error about its constructor arguments.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=True,
        logging_level=logging.INFO if verbose else logging.WARNING,
        logging_config=ray.LoggingConfig(log_level="INFO" if verbose else "ERROR"),
        # Ray's own processes (Ray Data tasks, the split coordinator) get raydiff's filters too.
        runtime_env=None if verbose else {"worker_process_setup_hook": RAY_SETUP_HOOK},
    )
    # Ray's LoggingConfig also sets this process's root logger to its level (ERROR): raydiff's own
    # warnings (the plan, skipped checkpoints) keep theirs.
    logging.getLogger("raydiff").setLevel(logging.INFO if verbose else logging.WARNING)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = verbose
    return True
