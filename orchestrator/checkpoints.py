"""Find and read raydiff checkpoints in a run directory (local or object storage).

Ray Train names checkpoint directories ``checkpoint_<timestamp>`` under ``{storage}/{name}``;
each holds the DeepSpeed shards, ``ema.pt``, ``train_state.json`` and ``config.yaml``.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass

import torch

from model.ema import EMA
from orchestrator.config import TrainConfig, load_config_text
from orchestrator.rundir import RunDir
from orchestrator.train_loop import CONFIG_FILE, EMA_FILE, MODEL_FILE, STATE_FILE, build_denoiser


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
