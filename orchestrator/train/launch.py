"""What the driver hands Ray Train: the workers' entry point and its arguments, kept free of the
training loop's imports.

``TorchTrainer`` pickles ``train_worker`` by reference, so whatever module defines it is imported
by the driver too. The loop (train/worker.py) imports torch, diffusers, DeepSpeed's step and,
through diffusers, peft and transformers: seconds the driver would spend before Ray even starts
(issue 18). Here the entry point imports the loop only inside the worker process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.train.faults import FaultHooks


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands each worker (plain data: it crosses process boundaries)."""

    config: dict[str, Any]  # with secrets revealed: in memory only, never written
    plan: dict[str, Any]
    num_classes: int | None
    bad_counter: str | None
    # Object ref of the held-out images (data.load_validation_images) when validating.
    val_images: Any = None
    # Checkpoint directory URI to start from when the run has none of its own (a population-based
    # training trial continuing from another trial's checkpoint), with this run's hyperparameters.
    init_checkpoint: str | None = None
    # The newest checkpoint of this run that verified (train/checkpoint/), chosen by the driver.
    resume_from: str | None = None
    # The dataset's class names (index order), saved in model.json; None for unconditional runs.
    class_names: list[str] | None = None
    # How rank 0 shows progress (orchestrator.logs.progress_mode, decided on the driver: a worker's
    # stdout is never a terminal) and whether library messages stay on (--verbose).
    progress: str = "off"
    verbose: bool = False
    # Object ref of the training data's reader (orchestrator.data.reader.TrainReader): every rank
    # reads its exact slice of each epoch through it.
    reader: Any = None
    # The fault-tolerance tests' hooks, read from the driver's environment (train/faults.py).
    faults: FaultHooks = field(default_factory=FaultHooks)
    # The driver's run lease holder id: every write to the run is fenced by it (storage/fence.py).
    lease_holder: str | None = None


def worker_env_vars(gpu: bool, verbose: bool) -> dict[str, str]:
    """The training workers' environment variables: Ray Train's ``worker_runtime_env``, and a local
    Ray's environment from its start, so that they need no runtime env (train/session_env.py)."""
    from orchestrator.logs import worker_env

    # DeepSpeed's accelerator named instead of every worker auto-detecting it (and warning about it).
    return {"DS_ACCELERATOR": "cuda" if gpu else "cpu", **worker_env(verbose)}


def train_worker(args: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker=train_worker, ...)``)."""
    t_entry = time.time()  # the worker group is up: Ray Train runs this on every rank
    wa = WorkerArgs(**args)
    run_worker = import_training_loop(wa.config)
    run_worker(wa, t_entry)


def import_training_loop(config: dict[str, Any]):
    """The loop's imports, in the worker process only; returns its entry point."""
    keep_unused_libraries_out(config)
    from orchestrator.train.worker import run_worker

    return run_worker


def keep_unused_libraries_out(config: dict[str, Any]) -> None:
    """Before a worker process imports diffusers: a Ray Train worker serves one run, and one
    without LoRA adapters never needs PEFT, which diffusers would otherwise import
    (model/pretrained.py ``diffusers_without_peft``: 0.4-0.6 CPU-s of every rank's start), and a
    registry network trained from scratch on class labels (or none) needs no text encoder, nor
    transformers and accelerate (``diffusers_without_transformers``, 0.8-1.0 CPU-s in all)."""
    model = config["model"]
    if not model["lora"]["rank"]:
        from model.pretrained import diffusers_without_peft

        diffusers_without_peft()
        from model.choices import is_text_model

        # A pretrained network may be text-conditioned (its pipeline says): it keeps everything.
        if model["pretrained"] is None and model["text_encoder"] is None and not is_text_model(model["name"]):
            from model.pretrained import diffusers_without_transformers

            diffusers_without_transformers()
