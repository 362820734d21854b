"""Writing and reading one checkpoint directory (layout.py says what it holds).

Training writes and reads the whole directory through a DeepSpeed engine; inference reads the
EMA weights, or the raw DeepSpeed weights consolidated to fp32. Neither checks the checkpoint: verify.py does, and manager.py calls it first.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.ema import EMA
from orchestrator.config import ConfigError, TrainConfig, config_to_yaml, load_config_text
from orchestrator.storage import RunDir, join, list_files, parse_uri, read_bytes, redact_uri
from orchestrator.train.checkpoint.elastic import (
    loading_universal,
    needs_conversion,
    universal_client_state,
    universal_copy,
)
from orchestrator.train.checkpoint.layout import (
    CONFIG_FILE,
    DS_TAG,
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointRef,
    saved_world_size,
)
from orchestrator.train.state import TrainState

MODEL_STATES = "mp_rank_00_model_states.pt"


def write_checkpoint(directory: str | Path, *, engine: Any, ema: EMA, state: TrainState, cfg: TrainConfig,
                     num_classes: int | None, rank: int, class_names: list[str] | None = None) -> None:
    """Write this rank's part of a checkpoint into a local directory (every rank calls it).
    ``class_names`` (the dataset's, index order) go to model.json for sampling by class name."""
    d = Path(directory)
    # ZeRO shards are per rank; Ray Train merges the ranks' directories into one. Frozen weights (a
    # LoRA run's pretrained network) are left out: they are model.pretrained's, unchanged.
    engine.save_checkpoint(str(d), tag=DS_TAG, client_state={"train_state": state.as_dict(),
                                                             **universal_client_state()},
                           exclude_frozen_parameters=has_frozen(engine.module))
    if rank == 0:
        torch.save(ema.state_dict(), d / EMA_FILE)
        (d / CONFIG_FILE).write_text(config_to_yaml(cfg))
        (d / MODEL_FILE).write_text(json.dumps({"num_classes": num_classes, "world_size": engine.world_size,
                                                   "zero_stage": engine.zero_optimization_stage(),
                                                   "class_names": class_names}))
        (d / STATE_FILE).write_text(json.dumps(state.as_dict()))


def has_frozen(module: torch.nn.Module) -> bool:
    """Whether ``module`` has frozen parameters, which its checkpoints leave out."""
    return any(not p.requires_grad for p in module.parameters())


def read_checkpoint(directory: str | Path, *, engine: Any, ema: EMA) -> TrainState:
    """Load a checkpoint directory into ``engine`` and ``ema``; returns the saved state. A
    checkpoint sharded over another number of workers is re-sharded (elastic.py)."""
    d = Path(directory)
    # Checkpoints of a module with frozen weights hold the trainable ones only (write_checkpoint).
    strict = not has_frozen(engine.module)
    if needs_conversion(d, DS_TAG, engine.dp_world_size):
        if engine.global_rank == 0:
            # print, like the worker's resume line: Ray drops worker log records below ERROR.
            print(f"raydiff: {d} was written by {saved_world_size(d)} workers, this run has {engine.dp_world_size}: "
                  "re-sharding its optimizer state through DeepSpeed's universal checkpoint", flush=True)
        with universal_copy(d, DS_TAG, local_rank=engine.local_rank, world=engine.dp_world_size,
                            barrier=dist.barrier) as root, loading_universal(engine):
            path, _ = engine.load_checkpoint(str(root), tag=DS_TAG, load_module_strict=strict)
    else:
        path, _ = engine.load_checkpoint(str(d), tag=DS_TAG, load_module_strict=strict)
    if path is None:
        raise RuntimeError(f"checkpoint {d} has no DeepSpeed state under tag {DS_TAG!r}")
    ema.load_state_dict(torch.load(d / EMA_FILE, map_location="cpu", weights_only=True))
    return TrainState(**json.loads((d / STATE_FILE).read_text()))


def _saved_denoiser(rundir: RunDir, ref: CheckpointRef) -> tuple[torch.nn.Module, TrainConfig]:
    """The untrained denoiser checkpoint ``ref`` was trained as, and its config."""
    # Here, not at module level: the driver imports this package and needs diffusers only when
    # it opens a model (start-up, issue 18).
    from orchestrator.builders import build_denoiser

    num_classes = json.loads(rundir.read_text(posixpath.join(ref.name, MODEL_FILE)))["num_classes"]
    cfg = load_config_text(rundir.read_text(posixpath.join(ref.name, CONFIG_FILE)))
    return build_denoiser(cfg.model, cfg.data, num_classes), cfg


def read_raw_model(rundir: RunDir, ref: CheckpointRef) -> tuple[torch.nn.Module, TrainConfig]:
    """The denoiser with the raw DeepSpeed weights of ``ref`` (eval mode), and its config."""
    model, cfg = _saved_denoiser(rundir, ref)
    missing, unexpected = model.load_state_dict(read_raw_state_dict(rundir, ref), strict=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trained & set(missing):
        raise ConfigError(f"{redact_uri(join(rundir.uri, ref.name))}: the DeepSpeed weights do not fit the network "
                          f"its config builds (missing {sorted(trained & set(missing))[:3]}, unexpected "
                          f"{sorted(unexpected)[:3]}). Fix: drop --raw to use the EMA weights (ema.pt)")
    model.eval()
    return model, cfg


def read_ema_model(rundir: RunDir, ref: CheckpointRef) -> tuple[torch.nn.Module, TrainConfig]:
    """The denoiser with EMA weights from checkpoint ``ref``, and the config it was trained with."""
    model, cfg = _saved_denoiser(rundir, ref)
    state = torch.load(io.BytesIO(rundir.read_bytes(posixpath.join(ref.name, EMA_FILE))), map_location="cpu",
                       weights_only=True)
    ema = EMA(model)
    ema.load_state_dict(state)
    ema.copy_to(model)
    model.eval()
    return model, cfg


def read_raw_state_dict(run: RunDir, ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The raw DeepSpeed weights of ``ref`` in fp32: consolidated from the ZeRO optimizer shards
    with DeepSpeed's ``zero_to_fp32`` when the checkpoint has them, else the module weights in
    ``mp_rank_00_model_states.pt`` (ZeRO stage 0)."""
    ds_uri = join(run.uri, ref.name, DS_TAG)
    files = [rel for rel, _ in list_files(ds_uri, run.s3)]
    if MODEL_STATES not in files and not any(f.endswith("_model_states.pt") for f in files):
        raise ConfigError(
            f"{redact_uri(ds_uri)} holds no DeepSpeed model states ({MODEL_STATES}); --raw needs the "
            "DeepSpeed part of a checkpoint. Fix: drop --raw to use the EMA weights (ema.pt)"
        )
    loc = parse_uri(ds_uri)
    with contextlib.ExitStack() as stack:
        if loc.is_s3:
            # zero_to_fp32 reads a local directory: copy the tag's files (shards included) down.
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="raydiff-raw-")))
            for rel in files:
                dest = root / DS_TAG / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(read_bytes(join(ds_uri, rel), run.s3))
        else:
            root = Path(loc.key).parent
        if any("zero_pp_rank_" in f and f.endswith("_optim_states.pt") for f in files):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            # It prints progress to stdout and a shard bar to stderr; keep the output to raydiff's own.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=DS_TAG)
            return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        blob = torch.load(root / DS_TAG / MODEL_STATES, map_location="cpu", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in blob["module"].items()}
