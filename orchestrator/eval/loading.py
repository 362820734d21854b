"""Open a checkpoint for inference: ``raydiff sample``, ``export`` and ``eval`` share this.

``--checkpoint`` names either a run directory (its newest checkpoint that verifies is used) or
one checkpoint directory, on local disk or in S3. The checkpoint owner (train/checkpoint/
manager.py) chooses and verifies it as training would, refuses a damaged one, and reads the
denoiser in eval mode with either the EMA weights (``ema.pt``, what the training grids and the
judge use) or the raw DeepSpeed weights (fp32, consolidated from ZeRO shards where there are any).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from orchestrator.config import ConfigError, TrainConfig
from orchestrator.storage import RunDir, join
from orchestrator.train.checkpoint.layout import MODEL_FILE, CheckpointRef
from orchestrator.train.checkpoint.manager import Checkpointer

if TYPE_CHECKING:
    from orchestrator.config import S3Config

Weights = Literal["ema", "raw"]


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


def _class_names(run: RunDir, ref: CheckpointRef, meta: dict) -> tuple[str, ...] | None:
    names = meta.get("class_names")
    if names is None and run.exists("eval.json"):
        # Checkpoints written before model.json carried class names: the judge's eval.json has them.
        names = json.loads(run.read_text("eval.json")).get("class_names")
    if names is None or meta.get("num_classes") is None or len(names) != meta["num_classes"]:
        return None
    return tuple(str(n) for n in names)


def load_checkpoint(uri: str, s3: "S3Config | None" = None, *, raw: bool = False,
                    name: str | None = None) -> LoadedCheckpoint:
    """The denoiser of checkpoint ``uri`` (run or checkpoint directory) with EMA or raw weights."""
    ck, ref = Checkpointer.open(uri, s3, name)
    run = ck.rundir
    meta = json.loads(run.read_text(posixpath.join(ref.name, MODEL_FILE)))
    # open() verified the checkpoint.
    model, cfg = ck.raw_model(ref, verify=False) if raw else ck.ema_model(ref, verify=False)
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
