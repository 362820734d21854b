"""Connect to a Ray cluster or start a local one, with raydiff's logging (used by train and tune)."""

from __future__ import annotations

import logging
import os

from orchestrator.logs import is_verbose


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
        # No job-level runtime_env (a worker_process_setup_hook, say): Ray matches worker
        # processes by runtime env, so with one every task and actor waits for a fresh process
        # (about 1.3 s each here) while the num_cpus workers Ray prestarts sit unused; without
        # one an actor starts in 0.15 s (issue 18). The processes that run raydiff's code apply
        # its filters themselves (logs.configure_worker, data/background.py).
    )
    # Ray's LoggingConfig also sets this process's root logger to its level (ERROR): raydiff's own
    # warnings (the plan, skipped checkpoints) keep theirs.
    logging.getLogger("raydiff").setLevel(logging.INFO if verbose else logging.WARNING)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = verbose
    return True
