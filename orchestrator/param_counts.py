"""Parameter counts of registry networks, remembered between runs (the plan prints them).

Counting builds the network on the meta device, which needs diffusers: with torch, peft and
transformers that import is 3-4 CPU-s of the driver before the first step, on the cores Ray is
starting on (issue 18: 2 s of the "ray" phase on 2 cores, measured with `raydiff bench startup`).
A registry network's count follows from its config, the image shape and diffusers' version, so it
is kept in raydiff's cache (data/source.py ``cache_root``) under a hash of those. A network read
from a pretrained directory or sized by a text encoder's files is counted every time: files can
change under the same config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from importlib import metadata
from pathlib import Path

from orchestrator.config import DataConfig, ModelConfig
from orchestrator.data.source import BUILTIN_TEXT_ENCODER, cache_root
from orchestrator.storage.files import write_bytes

# Bump when what a count means changes (e.g. trainable_parameters counts differently).
FORMAT = 1


def cache_key(model: ModelConfig, data: DataConfig) -> str | None:
    """The count's key, or None when it is not cached (see the module docstring)."""
    if model.pretrained is not None or (model.text_conditioned and model.text_encoder != BUILTIN_TEXT_ENCODER):
        return None
    try:
        diffusers = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return None
    what = {"format": FORMAT, "model": model.model_dump(mode="json"), "channels": data.channels,
            "resolution": data.resolution, "conditional": data.conditional, "diffusers": diffusers}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def _path(key: str) -> Path:
    return cache_root() / "parameter-counts" / f"{key}.json"


def lookup(model: ModelConfig, data: DataConfig) -> tuple[int, int] | None:
    """(trainable, total) as counted before, or None."""
    key = cache_key(model, data)
    if key is None:
        return None
    try:
        d = json.loads(_path(key).read_text())
        return int(d["trainable"]), int(d["total"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not counted yet, or unreadable: count again


def remember(model: ModelConfig, data: DataConfig, counts: tuple[int, int]) -> None:
    key = cache_key(model, data)
    if key is None:
        return
    with contextlib.suppress(OSError):  # a read-only or full cache: counted again next time
        write_bytes(str(_path(key)), json.dumps({"trainable": counts[0], "total": counts[1]}).encode())
