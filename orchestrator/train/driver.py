"""The driver side of a training run: validate, plan, prepare data, start Ray Train, evaluate."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.cluster.rules import check_cluster_paths, with_job_address
from orchestrator.background_import import import_in_background
from orchestrator.config import ConfigError, TrainConfig, config_to_dict, config_to_yaml
from orchestrator.data import inspect_dataset
from orchestrator.data.counter import bad_sample_counts, release_counter
from orchestrator.data.background import decode_in_background
from orchestrator.data.pipeline import load_validation_images
from orchestrator.data.reader import make_train_reader
from orchestrator.data.source import resolve_data_config, resolve_paths
from orchestrator.logs import is_verbose, progress_mode, ray_train_log_level
from orchestrator.plan import local_logical_cpus, make_plan, network_code_to_import
from orchestrator.ray_session import init_ray, shutdown_in_background
from orchestrator.report import report_after_training
from orchestrator.train.checkpoint.manager import Checkpointer
from orchestrator.train.checkpoint.persist import clear_staging
from orchestrator.train.failure import training_failed
from orchestrator.train.faults import FaultHooks
from orchestrator.train.startup import phase_event
from orchestrator.storage import RunDir, StorageError, acquire_lease, check_writable, fenced_rundir, ray_storage
from orchestrator.tracking import check_tracking_packages
from orchestrator.train.status import FINISHED_EVENT, dry_run_lines, read_status


def dry_run_text(cfg: TrainConfig) -> str:
    cfg = resolve_paths(cfg)
    plan = make_plan(cfg)
    return ("# resolved configuration\n" + config_to_yaml(cfg) + "\n# plan\n"
            + plan.describe(cfg, RunDir.for_config(cfg).uri) + "\n# run directory\n" + _run_text(cfg) + "\n")


def _run_text(cfg: TrainConfig) -> str:
    """Whether the run exists and where it would resume; storage that cannot be read is reported,
    not raised: a dry run also checks job specs for clusters whose buckets are not reachable here."""
    try:
        return "\n".join(dry_run_lines(cfg))
    except (StorageError, OSError) as e:
        return f"run: {RunDir.for_config(cfg).uri} could not be read from here ({e})"


@dataclass
class TrainOutcome:
    run_uri: str
    final_step: int
    checkpoint_path: str | None
    eval: dict[str, Any] | None
    bad_samples: dict[str, int]
    # The run had reached optim.steps and been evaluated before this call: nothing was started.
    already_complete: bool = False


def complete_outcome(cfg: TrainConfig) -> TrainOutcome | None:
    """The outcome of a run that is already complete (train/status.py), read without Ray."""
    st = read_status(cfg)
    if not st.complete and st.latest is not None and st.latest.step > cfg.optim.steps:
        # Resuming would start Ray and the workers only to train nothing, and the run's newest
        # files (grids, metrics) come from steps this config does not ask for.
        raise ConfigError(
            f"run {st.uri} is already at step {st.latest.step}, past optim.steps={cfg.optim.steps}: there is "
            f"nothing to train. Fix: set optim.steps={st.latest.step} or more to continue it, or a new "
            "run.name to train a new run with these settings")
    if not st.complete:
        return None
    return TrainOutcome(st.uri, st.latest.step, st.checkpoint_uri(), st.eval, st.bad_samples, already_complete=True)


def run_training(cfg: TrainConfig, *, callbacks: tuple[Any, ...] = (), init_checkpoint: str | None = None,
                 force: bool = False) -> TrainOutcome:
    """Train as configured; resumes when ``{storage}/{name}`` already has checkpoints. Holds the
    run's lease throughout (one writer per run; ``force`` takes over a live-looking one).

    ``callbacks`` go to Ray Train's ``RunConfig`` (a Tune trial passes its reporting bridge);
    ``init_checkpoint`` is a checkpoint directory URI to start from when the run has no
    checkpoint of its own (a population-based-training trial taking over another's)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train import LoggingConfig as TrainLoggingConfig

    from orchestrator.train.checkpoint.events import CheckpointEvents
    from orchestrator.train.launch import WorkerArgs, train_worker, worker_env_vars

    t_start = time.time()
    check_tracking_packages(cfg.logging)  # MLflow / W&B enabled but not installed: say so before anything starts
    given = cfg = with_job_address(cfg)
    if not callbacks:  # a Tune trial has checked this itself (tune/trainable.py): its reporting bridge expects a fit
        done = complete_outcome(resolve_paths(cfg))
        if done is not None:
            return done
    # Ray Train's trainer (orchestrator/train/trainer.py: Ray Train's modules, no torch; 1.6 s on 2
    # cores), needed once the data is ready, and the network code for the plan's parameter count
    # (when not cached) import while the plan is made and Ray starts, mostly waiting on other
    # processes (issue 18). One thread, started after the Ray Train imports above, so that no two
    # threads import the same packages at once, and only for a run that trains (a finished one
    # returns above without them).
    import_in_background("orchestrator.train.trainer", *network_code_to_import(cfg), name="raydiff-import")
    cfg = resolve_data_config(cfg)
    # Fail on unreachable storage or data before anything expensive starts.
    check_writable(cfg.run.storage, cfg.storage.s3)
    info = inspect_dataset(cfg.data)
    # A text model is conditioned on captions, not on the data's class labels (if it has any).
    num_classes = info.num_classes if cfg.data.conditional and not cfg.model.text_conditioned else None
    if cfg.model.pretrained is not None or cfg.model.unet is not None or cfg.model.dit is not None:
        # A pretrained model's classes and LoRA targets, and model.unet/dit arguments that diffusers
        # cannot build, are refused before anything starts.
        import torch

        from orchestrator.builders import build_denoiser

        with torch.device("meta"):
            build_denoiser(cfg.model, cfg.data, num_classes, weights=False)
    # One writer per run, decided before Ray starts (orchestrator/storage/lease.py).
    lease = acquire_lease(RunDir.for_config(cfg), force=force)
    started = False
    decode = counter = shutdown = None
    try:
        # A cluster's GPUs can be counted only once connected; any other plan is made before Ray
        # starts, so that a config the hardware rejects (fp16 on CPU) fails before anything starts.
        count_gpus_on_cluster = cfg.scaling.device == "auto" and cfg.scaling.ray_address is not None
        plan = None if count_gpus_on_cluster else make_plan(cfg)
        started = init_ray(cfg.scaling.ray_address, local_logical_cpus(cfg.scaling), one_run=True,
                           env=None if plan is None else worker_env_vars(plan.device == "gpu", is_verbose()))
        plan = plan or make_plan(cfg)
        check_cluster_paths(given, plan)
        # Every write by this driver and its workers is fenced by the lease (storage/fence.py).
        rundir = fenced_rundir(cfg, lease.holder_id)
        rundir.event({"event": "started", "time": t_start})
        rundir.event(phase_event("ray"))
        rundir.write_text("config.yaml", config_to_yaml(cfg))
        rundir.write_text("plan.json", json.dumps(plan.as_dict(), indent=2))
        # Output for the user, not a log record (a WARNING prefix would misreport it).
        print(f"raydiff plan:\n{plan.describe(cfg, rundir.uri)}", flush=True)
        checkpointer = Checkpointer(rundir)
        resume_from = checkpointer.prepare_resume()  # raydiff, not Ray's snapshot, picks the checkpoint
        clear_staging(rundir.uri)  # what killed runs left half-staged

        counter = f"raydiff-bad-samples-{cfg.run.name}"
        release_counter(counter)  # one a killed invocation of this run left: counts start afresh
        decoded_bytes = info.num_samples * cfg.data.channels * cfg.data.resolution**2 * 4
        # Each rank reads its exact slice of every epoch (data/reader.py); a decoded set small
        # enough for the object store is decoded once and later epochs skip read + decode. On this
        # machine's Ray that decode runs while the workers start (data/background.py): they need
        # it only at their first batch. On a cluster it runs first, as before: decode tasks
        # competing with the worker group for CPUs would make an autoscaler add nodes for them.
        cache = decoded_bytes <= cfg.data.cache_max_bytes
        background = cache and cfg.scaling.ray_address is None
        reader = make_train_reader(cfg.data, info, counter_name=counter, cache=cache and not background)
        if background:
            decode = decode_in_background(cfg.data, info, counter_name=counter, verbose=is_verbose())
            reader.cached = decode.blocks

        storage_path, storage_fs = ray_storage(cfg.run.storage, cfg.storage.s3)
        args = WorkerArgs(
            config=config_to_dict(cfg, reveal_secrets=True),
            plan=plan.as_dict(),
            num_classes=num_classes,
            bad_counter=counter,
            # A few hundred images at most, decoded here once and shared through the object store.
            val_images=ray.put(load_validation_images(cfg.data, info)) if cfg.logging.val_every_steps else None,
            init_checkpoint=init_checkpoint,
            resume_from=resume_from,
            class_names=list(info.class_names) if num_classes is not None else None,
            progress=progress_mode(cfg.logging.progress),
            verbose=is_verbose(),
            reader=ray.put(reader),
            # Test hooks read once, here: the workers read no environment (train/faults.py).
            faults=FaultHooks.from_env(),
            lease_holder=lease.holder_id,
        )
        resources = {"CPU": plan.cpus_per_worker}
        if plan.gpus_per_worker:
            resources["GPU"] = plan.gpus_per_worker
        from orchestrator.train.trainer import Trainer  # imported in the background above: waits for it

        trainer = Trainer(
            train_worker,
            # A local Ray this run started ends with it (``finally`` below), placement groups too.
            ray_session_ends_with_run=started and cfg.scaling.ray_address is None,
            train_loop_config=args.__dict__,
            scaling_config=ScalingConfig(
                num_workers=plan.num_workers,
                use_gpu=plan.device == "gpu",
                resources_per_worker=resources,
                accelerator_type=cfg.scaling.accelerator_type,
            ),
            run_config=RunConfig(
                name=cfg.run.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                # Pruned by CheckpointEvents (fenced, and also when a run fails), not by Ray Train.
                checkpoint_config=CheckpointConfig(num_to_keep=None),
                worker_runtime_env={"env_vars": worker_env_vars(plan.device == "gpu", is_verbose())},
                # The "checkpoint" events, recorded once every rank's part is committed.
                callbacks=[*callbacks, CheckpointEvents(rundir, cfg.checkpoint.keep)],
                logging_config=TrainLoggingConfig(log_level=ray_train_log_level(is_verbose())),
            ),
        )
        rundir.event(phase_event("data"))
        try:
            trainer.fit()
        except Exception as e:
            # A worker that found the lease taken failed the fit: say that, not Ray's traceback.
            if rundir.fence is not None:
                rundir.fence.check()
            # A failed decode fails every rank's first batch; its own error says what to fix.
            failed = decode.error() if decode is not None else None
            if failed is not None:
                raise failed from None
            if isinstance(e, TrainingFailedError):
                # run.max_failures restarts used up: one line naming the failure and how to
                # resume (train/failure.py), not every rank's traceback.
                latest = checkpointer.latest()
                raise training_failed(e, run_uri=rundir.uri, max_failures=cfg.run.max_failures,
                                      resume_step=latest.step if latest is not None else None) from e
            raise
        finally:
            if decode is not None:
                decode.stop()  # its blocks are not needed past training
        # From storage, not Result.metrics: a run that was already complete reports nothing new.
        checkpointer.prune(cfg.checkpoint.keep)
        latest = checkpointer.latest()
        final_step = latest.step if latest is not None else 0
        ckpt_path = f"{rundir.uri}/{latest.name}" if latest is not None else None
        eval_result = None
        if cfg.run.evaluate and num_classes is not None and latest is not None:
            from orchestrator.eval.judge import evaluate_run  # torch and the judge: only when evaluating

            eval_result = evaluate_run(cfg, info, num_classes, info.class_names, rundir, latest)
        elif cfg.run.evaluate and cfg.model.text_conditioned and latest is not None:
            from orchestrator.eval.compose import captioned_demo_root, evaluate_text_run

            # The text demo's score (held-out colour-shape prompts vs seen ones); other caption
            # data has no ground truth to judge samples against.
            demo_root = captioned_demo_root(cfg.data.source)
            if demo_root is not None:
                eval_result = evaluate_text_run(cfg, demo_root, rundir, latest)
        # Cumulative over every read of the data: exact when the decoded set is cached (read
        # once), a multiple of the per-pass counts when it is streamed every epoch.
        bad = bad_sample_counts(counter)
        if started and cfg.scaling.ray_address is None:
            # Nothing below needs Ray: the local Ray started here stops (a second of waiting for
            # its processes) while the report is drawn. A cluster connection is closed in
            # ``finally``, as before (its disconnect is quick; nothing to overlap).
            shutdown = shutdown_in_background()
        if bad:
            rundir.write_text("bad_samples.json", json.dumps(bad, indent=2))
        # Read by train/status.py: a rerun of this run at these optim.steps starts nothing.
        rundir.event({"event": FINISHED_EVENT, "step": final_step, "time": time.time()})
        with rundir.fence.writing():
            report_after_training(rundir.uri, cfg.storage.s3)  # {run}/report.png: curves and newest samples
        return TrainOutcome(rundir.uri, final_step, ckpt_path, eval_result, bad)
    finally:
        if counter is not None and not started:
            release_counter(counter)  # a Ray session that outlives the run keeps no idle counter
        if shutdown is not None:
            shutdown.join()
        elif started:
            ray.shutdown()
        lease.release()
