"""What a checkpoint directory holds and how a run directory's checkpoints are listed.

Ray Train names checkpoint directories as raydiff asks, ``checkpoint_<step>`` under
``{storage}/{name}``. Each holds the DeepSpeed shards of every rank (tag ``ds``), and from rank 0
``ema.pt`` (the EMA weights), ``train_state.json`` (step, samples seen, data position),
``config.yaml`` (the resolved config, credentials masked) and ``model.json`` (what the config
cannot say: the number of classes found in the data, the world size). ``train_state.json`` is
written last by rank 0, so a directory without it is an incomplete upload and is never resumed
from; each rank adds ``manifest.rank<r>.json`` when it persists its part (persist.py), and
verify.py decides which checkpoint can be trusted.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator.storage import RunDir, join

log = logging.getLogger("raydiff")

DS_TAG = "ds"
STATE_FILE = "train_state.json"
EMA_FILE = "ema.pt"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.json"
PREFIX = "checkpoint_"


def checkpoint_dir_name(step: int) -> str:
    """Checkpoint directories are named by step, so a listing reads in training order."""
    return f"{PREFIX}{step:08d}"


def checkpoint_step(uri: str) -> int | None:
    """The step in a checkpoint directory's name (``checkpoint_<step>``)."""
    name = posixpath.basename(uri.rstrip("/"))
    head, _, digits = name.partition("_")
    return int(digits) if head == "checkpoint" and digits.isdigit() else None


@dataclass(frozen=True)
class CheckpointRef:
    name: str  # directory name inside the run directory
    step: int


@dataclass(frozen=True)
class Listing:
    refs: list[CheckpointRef]  # complete checkpoints, oldest first
    unreadable: tuple[tuple[str, str], ...]  # (name, problem): train_state.json is not valid


def read_step(rundir: RunDir, name: str) -> int:
    """The step in ``name/train_state.json``; ValueError naming the file when it is not readable."""
    rel = posixpath.join(name, STATE_FILE)
    try:
        step = json.loads(rundir.read_text(rel))["step"]
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step is {step!r}, not an integer")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{join(rundir.uri, rel)}: unreadable ({type(e).__name__}: {e})") from None
    return step


def scan_checkpoints(rundir: RunDir) -> Listing:
    """The run's complete checkpoints, and those whose train_state.json cannot be read."""
    refs, unreadable = [], []
    for name in rundir.listdir():
        if not name.startswith(PREFIX) or not rundir.exists(posixpath.join(name, STATE_FILE)):
            continue  # not a checkpoint, or an incomplete upload: never resume from it
        try:
            refs.append(CheckpointRef(name, read_step(rundir, name)))
        except ValueError as e:
            unreadable.append((name, str(e)))
    return Listing(sorted(refs, key=lambda r: r.step), tuple(unreadable))


def list_checkpoints(rundir: RunDir, warn: Callable[[str], None] = log.warning) -> list[CheckpointRef]:
    """The run's complete checkpoints, oldest first; one whose train_state.json is unreadable is
    left out with a warning naming the file."""
    listing = scan_checkpoints(rundir)
    for name, problem in listing.unreadable:
        warn(f"raydiff: skipping checkpoint {name}: {problem}")
    return listing.refs


def saved_world_size(checkpoint_dir: str | Path) -> int | None:
    """The world size a local checkpoint was written with (model.json), None when not recorded."""
    try:
        return json.loads((Path(checkpoint_dir) / MODEL_FILE).read_text()).get("world_size")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
