"""The checkpoint layout: what a checkpoint directory holds, how it is written and read back,
and how the model is rebuilt from it.

Ray Train names checkpoint directories ``checkpoint_<timestamp>`` under ``{storage}/{name}``.
Each holds the DeepSpeed shards of every rank (tag ``ds``), and from rank 0 ``ema.pt`` (the EMA
weights), ``train_state.json`` (step, samples seen, data position), ``config.yaml`` (the
resolved config, credentials masked) and ``model.json`` (what the config cannot say: the number
of classes found in the data). ``train_state.json`` is written last by rank 0, so a directory
without it is an incomplete upload and is never resumed from.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.ema import EMA
from model.registry import build_model
from orchestrator.config import TrainConfig, config_to_yaml, load_config_text
from orchestrator.storage import RunDir, parse_uri
from orchestrator.train.state import TrainState

DS_TAG = "ds"
STATE_FILE = "train_state.json"
EMA_FILE = "ema.pt"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.json"


def build_denoiser(cfg: TrainConfig, num_classes: int | None) -> torch.nn.Module:
    """The registry model that ``cfg`` describes (trainer, sample grids and checkpoint loading)."""
    return build_model(cfg.model.name, in_channels=cfg.data.channels, image_size=cfg.data.resolution,
                       num_classes=num_classes)


def write_checkpoint(directory: str | Path, *, engine: Any, ema: EMA, state: TrainState, cfg: TrainConfig,
                     num_classes: int | None, rank: int) -> None:
    """Write this rank's part of a checkpoint into a local directory (every rank calls it)."""
    d = Path(directory)
    # ZeRO shards are per rank; Ray Train merges the ranks' directories into one.
    engine.save_checkpoint(str(d), tag=DS_TAG, client_state={"train_state": state.as_dict()})
    if rank == 0:
        torch.save(ema.state_dict(), d / EMA_FILE)
        (d / CONFIG_FILE).write_text(config_to_yaml(cfg))
        (d / MODEL_FILE).write_text(json.dumps({"num_classes": num_classes}))
        (d / STATE_FILE).write_text(json.dumps(state.as_dict()))


def read_checkpoint(directory: str | Path, *, engine: Any, ema: EMA) -> TrainState:
    """Load a checkpoint directory into ``engine`` and ``ema``; returns the saved state."""
    d = Path(directory)
    path, _ = engine.load_checkpoint(str(d), tag=DS_TAG)
    if path is None:
        raise RuntimeError(f"checkpoint {d} has no DeepSpeed state under tag {DS_TAG!r}")
    ema.load_state_dict(torch.load(d / EMA_FILE, map_location="cpu", weights_only=False))
    return TrainState(**json.loads((d / STATE_FILE).read_text()))


def checkpoint_dir_name(step: int) -> str:
    """Checkpoint directories are named by step, so a listing reads in training order."""
    return f"checkpoint_{step:08d}"


def staging_dir(run_uri: str, step: int, rank: int) -> str:
    """Where a rank writes its part of a checkpoint before it is persisted.

    For a local run directory the staging area is inside it, on the same filesystem, so that
    persisting is a rename (``MoveIntoRun``), not a second copy of gigabytes of optimizer state.
    For object storage it is a local temporary directory that Ray uploads in the background.
    """
    loc = parse_uri(run_uri)
    if loc.is_s3:
        return tempfile.mkdtemp(prefix=f"raydiff-ckpt-{step}-r{rank}-")
    d = Path(loc.key) / ".staging" / f"step_{step:08d}_rank{rank}"
    shutil.rmtree(d, ignore_errors=True)  # left over by a run killed while staging
    d.mkdir(parents=True)
    return str(d)


class MoveIntoRun:
    """``checkpoint_upload_fn`` for local run directories: moves a rank's staged files into
    ``{run}/{checkpoint_dir_name}`` (ranks merge into one directory) by rename."""

    def __init__(self, run_dir: str):
        self.run_dir = Path(run_dir)

    def __call__(self, checkpoint: Any, dir_name: str) -> Any:
        from ray.train import Checkpoint

        src, dest = Path(checkpoint.path), self.run_dir / dir_name
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            target = dest / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
        shutil.rmtree(src, ignore_errors=True)
        return Checkpoint.from_directory(str(dest))


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
                       weights_only=False)
    ema = EMA(model)
    ema.load_state_dict(state)
    ema.copy_to(model)
    model.eval()
    return model, cfg
