"""Checkpoints written without Ray or DeepSpeed, in the layout of orchestrator/train/checkpoint/layout.py,
for the sample / export / eval tests: ema.pt, config.yaml, model.json, train_state.json, and
optionally ``ds/mp_rank_00_model_states.pt`` the way DeepSpeed writes it without ZeRO partitioning;
and ``adam_steps``, which reads what a real run's DeepSpeed saved (the resume tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.ema import EMA
from orchestrator.config import TrainConfig, config_to_yaml, load_config
from orchestrator.builders import build_denoiser
from orchestrator.train.checkpoint.layout import CONFIG_FILE, DS_TAG, EMA_FILE, MODEL_FILE, STATE_FILE
from orchestrator.train.state import TrainState


def tiny_config(*overrides: str) -> TrainConfig:
    return load_config(None, ["model.name=unet-tiny", "data.resolution=16", "sampling.num_steps=4", "sampling.per_class=2", *overrides])


@torch.no_grad()
def perturbed_model(cfg: TrainConfig, num_classes: int | None, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """A freshly built denoiser with every parameter moved by seeded noise: freshly initialised
    layers output near-constant values (zero-initialised projections), which would make output
    comparisons vacuous."""
    torch.manual_seed(seed)
    model = build_denoiser(cfg.model, cfg.data, num_classes)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def write_checkpoint_dir(run_dir: Path, cfg: TrainConfig, ema_model: torch.nn.Module, *, step: int,
                         num_classes: int | None, class_names=None, raw_model: torch.nn.Module | None = None) -> Path:
    d = Path(run_dir) / f"checkpoint_{step:08d}"
    d.mkdir(parents=True)
    torch.save(EMA(ema_model).state_dict(), d / EMA_FILE)
    (d / CONFIG_FILE).write_text(config_to_yaml(cfg))
    meta = {"num_classes": num_classes}
    if class_names is not None:
        meta["class_names"] = list(class_names)
    (d / MODEL_FILE).write_text(json.dumps(meta))
    if raw_model is not None:
        (d / DS_TAG).mkdir()
        torch.save({"module": raw_model.state_dict()}, d / DS_TAG / "mp_rank_00_model_states.pt")
    (d / STATE_FILE).write_text(json.dumps(TrainState(step=step).as_dict()))
    return d


def adam_steps(checkpoint_dir: Path) -> list[int]:
    """Adam's step counter of every parameter group in every ZeRO optimizer shard of a checkpoint
    (``ds/*_optim_states.pt``, one per rank), as DeepSpeed saved it."""
    steps = []
    shards = sorted((checkpoint_dir / "ds").glob("*_optim_states.pt"))
    assert shards, checkpoint_dir
    for shard in shards:
        state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
        groups = state["state"].values() if isinstance(state, dict) else state
        steps += [int(g["step"]) for g in groups]
    assert steps, checkpoint_dir
    return steps
