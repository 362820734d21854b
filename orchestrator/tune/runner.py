"""Running a sweep: Ray, searcher, scheduler, ``Tuner`` (or ``Tuner.restore``), results.

The sweep directory is ``{run.storage}/{run.name}``: ``sweep.yaml`` (the job as started),
``tune/`` (Ray Tune's experiment state and trial directories), one run directory per trial
(``{trial_id}``, plus ``{trial_id}-x{step}-{donor}`` per PBT exploit), and the outputs
``results.csv``, ``metric.png``, ``best.yaml``. Running the same command again restores the
experiment: finished trials are kept, unfinished ones continue from their checkpoints.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import yaml

from orchestrator.cluster.rules import with_job_address
from orchestrator.config import ConfigError, config_to_dict, config_to_yaml
from orchestrator.data.source import resolve_data_config
from orchestrator.storage import RunDir, check_writable, join, ray_storage
from orchestrator.tune import results as R
from orchestrator.tune import space as S
from orchestrator.ray_session import init_ray, ray_train_settings, state_api_served
from orchestrator.tune.config import TuneJob

log = logging.getLogger("raydiff.tune")

SWEEP_FILE = "sweep.yaml"
TUNE_DIR = "tune"


@dataclass
class SweepOutcome:
    sweep_uri: str
    restored: bool
    table: Any  # pandas DataFrame, one row per trial
    csv_uri: str
    png_uri: str | None
    best_uri: str | None


def _scheduler(job: TuneJob) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    t = job.tune
    if t.scheduler == "asha":
        max_t = max([job.optim.steps] + [int(v) for v in _values(t.space.get("optim.steps"))])
        return ASHAScheduler(time_attr="step", max_t=max_t, grace_period=t.asha.grace_period,
                             reduction_factor=t.asha.reduction_factor, brackets=t.asha.brackets)
    if t.scheduler == "pbt":
        random.seed(t.seed)  # PBT draws its perturbations from the random module
        return PopulationBasedTraining(
            time_attr="step",
            perturbation_interval=t.pbt.perturbation_interval,
            burn_in_period=t.pbt.burn_in_steps,
            hyperparam_mutations=S.pbt_mutations(t.space, job.pbt_keys()),
            quantile_fraction=t.pbt.quantile_fraction,
            resample_probability=t.pbt.resample_probability,
            synch=t.pbt.synch,
            custom_explore_fn=functools.partial(S.clip_to_space, space=t.space),
        )
    return FIFOScheduler()


def _values(spec: dict[str, Any] | None) -> list[Any]:
    if not spec:
        return []
    return list(spec.get("choice") or spec.get("grid") or spec.get("randint") or spec.get("uniform") or [])


def _searcher(job: TuneJob) -> Any:
    from ray.tune.search import BasicVariantGenerator

    t = job.tune
    if t.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=t.seed)
    # Given a search algorithm, Tune applies max_concurrent_trials only to model-based searchers:
    # the variant generator takes it itself (seen: all 4 grid trials started at once without it).
    return BasicVariantGenerator(random_state=t.seed, max_concurrent=t.max_concurrent_trials)


def _logical_cpus(job: TuneJob) -> int:
    """Local Ray: room for the concurrent trials' drivers and workers plus Ray Data's tasks."""
    t, s = job.tune, job.scaling
    need = t.max_concurrent_trials * (t.resources.cpu + s.num_workers * s.cpus_per_worker) + 2
    return max(os.cpu_count() or 1, int(need + 0.999))


def _check_same_sweep(job: TuneJob, sweep: RunDir) -> None:
    """A sweep directory belongs to one job: resuming with another config would mix trials."""
    text = config_to_yaml(job)
    if not sweep.exists(SWEEP_FILE):
        sweep.write_text(SWEEP_FILE, text)
        return
    old = sweep.read_text(SWEEP_FILE)
    if old == text:
        return
    changed = [line[1:].strip() for line in difflib.unified_diff(old.splitlines(), text.splitlines(), lineterm="", n=0)
               if line[:1] in "+" and not line.startswith("+++")]
    raise ConfigError(
        f"sweep {sweep.uri} was started with another configuration (now: {'; '.join(changed[:4])}). "
        f"Fix: rerun with the same job and overrides to resume it, or set run.name to start a new sweep"
    )


def run_sweep(job: TuneJob) -> SweepOutcome:
    """Start the sweep, or resume it when its directory already holds Tune's state."""
    import ray
    from ray import tune

    from orchestrator.tune.asha import AshaRungs
    from orchestrator.tune.cleanup import ReapPlacementGroups, get_registry
    from orchestrator.tune.trainable import SweepSpec, tune_trial
    from orchestrator.tune.vault import vaulted_filesystem

    # Inside a Ray Job (ray job submit ... raydiff tune), join the job's cluster as train does.
    job = job.model_copy(update={"scaling": with_job_address(job).scaling})
    train_cfg = resolve_data_config(job.training_config())  # builtin data written once, not per trial
    check_writable(train_cfg.run.storage, train_cfg.storage.s3)
    sweep_uri = join(train_cfg.run.storage, train_cfg.run.name)
    sweep = RunDir(sweep_uri, train_cfg.storage.s3)
    _check_same_sweep(job, sweep)
    t = job.tune
    started = init_ray(job.scaling.ray_address, _logical_cpus(job))
    try:
        # Held here for the whole sweep: a named actor still dies with its last handle.
        registry = get_registry(train_cfg.run.name, create=True)
        spec = SweepSpec(base=config_to_dict(train_cfg, reveal_secrets=True), sweep_uri=sweep_uri,
                         sweep=train_cfg.run.name, metric=t.metric, ray_train_settings=ray_train_settings(),
                         state_api=state_api_served(), replay_resume_point=t.scheduler == "asha")
        resources = {"CPU": t.resources.cpu, **({"GPU": t.resources.gpu} if t.resources.gpu else {})}
        trainable = tune.with_resources(tune.with_parameters(tune_trial, spec=spec), resources)
        storage_path, fs = ray_storage(sweep_uri, train_cfg.storage.s3)
        vault = None
        if fs is not None:  # S3: Tune writes its RunConfig to the bucket; the keys stay in a vault
            fs, vault = vaulted_filesystem(train_cfg.storage.s3, train_cfg.run.name)
        exp_path = f"{storage_path}/{TUNE_DIR}"
        restored = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
        history = functools.partial(R.trial_history, job)
        if restored:
            print(f"raydiff: resuming sweep {sweep_uri} (finished trials are kept)", flush=True)
            tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True,
                                       param_space=S.param_space(t.space), storage_filesystem=fs)
            if t.scheduler == "asha":
                _attach_history(tuner, history)
        else:
            scheduler = _scheduler(job)
            callbacks: list[Any] = [ReapPlacementGroups(train_cfg.run.name)]
            if t.scheduler == "asha":
                callbacks.append(AshaRungs(scheduler, history))  # Tune does not save scheduler state
            tuner = tune.Tuner(
                trainable,
                param_space=S.param_space(t.space),
                tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples,
                                            max_concurrent_trials=t.max_concurrent_trials, scheduler=scheduler,
                                            search_alg=_searcher(job), reuse_actors=False),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=storage_path, storage_filesystem=fs,
                                          failure_config=tune.FailureConfig(max_failures=t.max_failures),
                                          callbacks=callbacks),
            )
        grid = tuner.fit()
        del registry, vault
        table = R.results_table(grid, job)
        return SweepOutcome(sweep_uri, restored, table, *R.write_outputs(table, grid, job, sweep))
    finally:
        if started:
            ray.shutdown()


def _attach_history(tuner: Any, history: Any) -> None:
    """Give the restored sweep's ``AshaRungs`` (unpickled from the Tuner's state, where it is
    saved without its storage reader) the trials' metric histories."""
    from orchestrator.tune.asha import AshaRungs

    local = getattr(tuner, "_local_tuner", None)  # Ray Tune 2.60's Tuner, outside Ray Client
    callbacks = (local.get_run_config().callbacks or []) if local is not None else []
    found = [cb for cb in callbacks if isinstance(cb, AshaRungs)]
    for cb in found:
        cb.history = history
    if not found:
        log.warning("the restored sweep's ASHA rungs are not completed from the trials' metric logs "
                    "(no AshaRungs callback in the restored Tuner): they hold what Tune saved")


def describe(job: TuneJob) -> str:
    """What ``raydiff tune --dry-run`` prints: the space and the sweep's settings."""
    t = job.tune
    lines = [f"sweep           : {join(job.run.storage, job.run.name)}",
             f"trials          : {job.num_trials()} ({t.max_concurrent_trials} at a time)",
             f"searcher        : {t.searcher} (seed {t.seed})",
             f"scheduler       : {t.scheduler}" + {
                 "asha": f" (grace {t.asha.grace_period} steps, reduction factor {t.asha.reduction_factor:g})",
                 "pbt": f" (every {t.pbt.perturbation_interval} steps, mutate {', '.join(job.pbt_keys())})",
                 "fifo": ""}[t.scheduler],
             f"metric          : {t.metric} ({t.mode}), steps per trial {job.optim.steps}",
             f"trial resources : driver {t.resources.cpu:g} CPU {t.resources.gpu:g} GPU + "
             f"{job.scaling.num_workers} worker(s) x {job.scaling.cpus_per_worker:g} CPU",
             "search space    :"]
    lines += [f"  {k}: {yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in t.space.items()]
    return "\n".join(lines)
