"""Open a checkpoint for inference: ``raydiff sample``, ``export`` and ``eval`` share this.

``--checkpoint`` names either a run directory (its newest checkpoint that verifies is used) or
one checkpoint directory, on local disk or in S3; the checkpoint owner (train/checkpoint/
manager.py) chooses and verifies it as training would, and refuses a damaged one. The denoiser comes back in eval mode with either
the EMA weights (``ema.pt``, what the training grids and the judge use) or the raw DeepSpeed
weights: fp32 master weights consolidated from the ZeRO optimizer shards with DeepSpeed's
``zero_to_fp32`` when the checkpoint has them, else the module weights in
``mp_rank_00_model_states.pt`` (ZeRO stage 0).
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from orchestrator.builders import build_denoiser
from orchestrator.config import ConfigError, TrainConfig, load_config_text
from orchestrator.storage import RunDir, join, list_files, parse_uri, read_bytes, redact_uri
from orchestrator.train.checkpoint.layout import CONFIG_FILE, DS_TAG, MODEL_FILE, CheckpointRef
from orchestrator.train.checkpoint.manager import Checkpointer

if TYPE_CHECKING:
    from orchestrator.config import S3Config

Weights = Literal["ema", "raw"]
MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module  # model.networks.Denoiser, eval mode, on CPU
    cfg: TrainConfig  # the config it was trained with
    class_names: tuple[str, ...] | None
    run: RunDir  # the run directory that holds the checkpoint
    ref: CheckpointRef
    weights: Weights

    @property
    def uri(self) -> str:
        return join(self.run.uri, self.ref.name)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.model, "num_classes", None)


def resolve_checkpoint(uri: str, s3: "S3Config | None" = None, name: str | None = None) -> tuple[RunDir, CheckpointRef]:
    """(run directory, verified checkpoint) for a run directory or a checkpoint directory ``uri``;
    ``name`` picks one checkpoint directory of a run by name (default: the newest good one)."""
    ck, ref = Checkpointer.open(uri, s3, name)
    return ck.rundir, ref


def _class_names(run: RunDir, ref: CheckpointRef, meta: dict) -> tuple[str, ...] | None:
    names = meta.get("class_names")
    if names is None and run.exists("eval.json"):
        # Checkpoints written before model.json carried class names: the judge's eval.json has them.
        names = json.loads(run.read_text("eval.json")).get("class_names")
    if names is None or meta.get("num_classes") is None or len(names) != meta["num_classes"]:
        return None
    return tuple(str(n) for n in names)


def _raw_state_dict(run: RunDir, ref: CheckpointRef) -> dict[str, torch.Tensor]:
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


def load_checkpoint(uri: str, s3: "S3Config | None" = None, *, raw: bool = False,
                    name: str | None = None) -> LoadedCheckpoint:
    """The denoiser of checkpoint ``uri`` (run or checkpoint directory) with EMA or raw weights."""
    ck, ref = Checkpointer.open(uri, s3, name)
    run = ck.rundir
    meta = json.loads(run.read_text(posixpath.join(ref.name, MODEL_FILE)))
    if raw:
        cfg = load_config_text(run.read_text(posixpath.join(ref.name, CONFIG_FILE)))
        model = build_denoiser(cfg, meta["num_classes"])
        model.load_state_dict(_raw_state_dict(run, ref))
        model.eval()
    else:
        model, cfg = ck.ema_model(ref, verify=False)  # open() verified it
    return LoadedCheckpoint(model, cfg, _class_names(run, ref, meta), run, ref, "raw" if raw else "ema")


def parse_labels(spec: str, num_classes: int | None, class_names: tuple[str, ...] | None) -> list[int]:
    """``"0,3,7"`` or ``"red-circle,7"`` -> class indices. A name matches a class name exactly,
    or without the demo dataset's ``NN-`` index prefix (``red-circle`` = ``00-red-circle``)."""
    if num_classes is None:
        raise ConfigError("--labels: this model is unconditional (trained without class labels). Fix: drop --labels")
    lookup: dict[str, int] = {}
    for i, n in enumerate(class_names or ()):
        lookup[n] = i
        prefix, _, rest = n.partition("-")
        if rest and prefix.isdigit():
            lookup.setdefault(rest, i)
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.lstrip("-").isdigit():
            idx = int(item)
            if not 0 <= idx < num_classes:
                raise ConfigError(f"--labels {item}: class indices run from 0 to {num_classes - 1}")
        elif item in lookup:
            idx = lookup[item]
        elif class_names is None:
            raise ConfigError(
                f"--labels {item!r}: this checkpoint stores no class names. Fix: give class indices 0..{num_classes - 1}"
            )
        else:
            raise ConfigError(f"--labels {item!r}: unknown class. Classes: " + ", ".join(
                f"{i}={n}" for i, n in enumerate(class_names)))
        out.append(idx)
    if not out:
        raise ConfigError("--labels is empty. Fix: give class indices or names separated by commas, e.g. --labels 0,3,7")
    return out
