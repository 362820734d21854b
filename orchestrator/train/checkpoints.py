"""The checkpoint layout: what a checkpoint directory holds, how it is written and read back,
and how the model is rebuilt from it.

Ray Train names checkpoint directories ``checkpoint_<timestamp>`` under ``{storage}/{name}``.
Each holds the DeepSpeed shards of every rank (tag ``ds``), and from rank 0 ``ema.pt`` (the EMA
weights), ``train_state.json`` (step, samples seen, data position), ``config.yaml`` (the
resolved config, credentials masked) and ``model.json`` (what the config cannot say: the number
of classes found in the data, the world size). ``train_state.json`` is written last by rank 0,
so a directory without it is an incomplete upload and is never resumed from; each rank adds
``manifest.rank<r>.json`` when it persists its part (train/persist.py), and train/verify.py
decides which checkpoint can be trusted.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.ema import EMA
from orchestrator import builders
from orchestrator.config import TrainConfig, config_to_yaml, load_config_text
from orchestrator.storage import RunDir
from orchestrator.train.elastic import (
    loading_universal,
    needs_conversion,
    saved_world_size,
    universal_client_state,
    universal_copy,
)
from orchestrator.train.state import TrainState

DS_TAG = "ds"
STATE_FILE = "train_state.json"
EMA_FILE = "ema.pt"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.json"


def build_denoiser(cfg: TrainConfig, num_classes: int | None) -> torch.nn.Module:
    """The registry model that ``cfg`` describes (until the checkpoint package calls builders directly)."""
    return builders.build_denoiser(cfg.model, cfg.data, num_classes)


def write_checkpoint(directory: str | Path, *, engine: Any, ema: EMA, state: TrainState, cfg: TrainConfig,
                     num_classes: int | None, rank: int, class_names: list[str] | None = None) -> None:
    """Write this rank's part of a checkpoint into a local directory (every rank calls it).
    ``class_names`` (the dataset's, index order) go to model.json for sampling by class name."""
    d = Path(directory)
    # ZeRO shards are per rank; Ray Train merges the ranks' directories into one.
    engine.save_checkpoint(str(d), tag=DS_TAG, client_state={"train_state": state.as_dict(),
                                                             **universal_client_state()})
    if rank == 0:
        torch.save(ema.state_dict(), d / EMA_FILE)
        (d / CONFIG_FILE).write_text(config_to_yaml(cfg))
        (d / MODEL_FILE).write_text(json.dumps({"num_classes": num_classes, "world_size": engine.world_size,
                                                   "zero_stage": engine.zero_optimization_stage(),
                                                   "class_names": class_names}))
        (d / STATE_FILE).write_text(json.dumps(state.as_dict()))


def read_checkpoint(directory: str | Path, *, engine: Any, ema: EMA) -> TrainState:
    """Load a checkpoint directory into ``engine`` and ``ema``; returns the saved state. A
    checkpoint sharded over another number of workers is re-sharded (train/elastic.py)."""
    d = Path(directory)
    if needs_conversion(d, DS_TAG, engine.dp_world_size):
        import torch.distributed as dist

        if engine.global_rank == 0:
            # print, like the worker's resume line: Ray drops worker log records below ERROR.
            print(f"raydiff: {d} was written by {saved_world_size(d)} workers, this run has {engine.dp_world_size}: "
                  "re-sharding its optimizer state through DeepSpeed's universal checkpoint", flush=True)
        with universal_copy(d, DS_TAG, local_rank=engine.local_rank, world=engine.dp_world_size,
                            barrier=dist.barrier) as root, loading_universal(engine):
            path, _ = engine.load_checkpoint(str(root), tag=DS_TAG)
    else:
        path, _ = engine.load_checkpoint(str(d), tag=DS_TAG)
    if path is None:
        raise RuntimeError(f"checkpoint {d} has no DeepSpeed state under tag {DS_TAG!r}")
    ema.load_state_dict(torch.load(d / EMA_FILE, map_location="cpu", weights_only=True))
    return TrainState(**json.loads((d / STATE_FILE).read_text()))


def read_checkpoint_uri(uri: str, s3: Any, *, engine: Any, ema: EMA) -> TrainState:
    """``read_checkpoint`` for a checkpoint directory given by URI (local or ``s3://``)."""
    from ray.train import Checkpoint

    from orchestrator.storage import ray_storage

    path, fs = ray_storage(uri, s3)
    with Checkpoint(path, filesystem=fs).as_directory() as d:
        return read_checkpoint(d, engine=engine, ema=ema)


def checkpoint_dir_name(step: int) -> str:
    """Checkpoint directories are named by step, so a listing reads in training order."""
    return f"checkpoint_{step:08d}"


@dataclass(frozen=True)
class CheckpointRef:
    name: str  # directory name inside the run directory
    step: int


def list_checkpoints(rundir: RunDir) -> list[CheckpointRef]:
    refs = []
    for name in rundir.listdir():
        if not name.startswith("checkpoint_"):
            continue
        rel = posixpath.join(name, STATE_FILE)
        if not rundir.exists(rel):
            continue  # an incomplete upload: never resume from it
        refs.append(CheckpointRef(name, int(json.loads(rundir.read_text(rel))["step"])))
    return sorted(refs, key=lambda r: r.step)


def latest_checkpoint(rundir: RunDir) -> CheckpointRef | None:
    refs = list_checkpoints(rundir)
    return refs[-1] if refs else None


def load_ema_model(rundir: RunDir, ref: CheckpointRef) -> tuple[torch.nn.Module, TrainConfig]:
    """The denoiser with EMA weights from checkpoint ``ref``, and the config it was trained with."""
    num_classes = json.loads(rundir.read_text(posixpath.join(ref.name, MODEL_FILE)))["num_classes"]
    cfg = load_config_text(rundir.read_text(posixpath.join(ref.name, CONFIG_FILE)))
    model = build_denoiser(cfg, num_classes)
    state = torch.load(io.BytesIO(rundir.read_bytes(posixpath.join(ref.name, EMA_FILE))), map_location="cpu",
                       weights_only=True)
    ema = EMA(model)
    ema.load_state_dict(state)
    ema.copy_to(model)
    model.eval()
    return model, cfg
