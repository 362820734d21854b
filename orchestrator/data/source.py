"""Where a run's data (and run directory) are, as every process must see them: local paths made
absolute, and ``data.source=builtin`` turned into a real image folder written on first use (with
``data.captions``: the captioned demo and its text encoder, ``orchestrator/data/demo_text.py``).

Used by training, tuning and evaluation alike, before anything reads the data.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.config import ConfigError, DataConfig, TrainConfig
from orchestrator.data.demo import write_demo_dataset


def _is_local(uri: str) -> bool:
    return "://" not in uri


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def cache_root() -> Path:
    """raydiff's per-user cache (``RAYDIFF_CACHE_DIR``, default ``~/.cache/raydiff``): what runs
    share and can recompute (the built-in dataset, parameter counts)."""
    return Path(os.environ.get("RAYDIFF_CACHE_DIR", Path.home() / ".cache" / "raydiff"))


def builtin_data_dir(data: DataConfig) -> Path:
    """Where the built-in dataset is written: a per-user cache shared by all runs."""
    base = cache_root()
    # data.captions: the captioned variant (orchestrator/data/demo_text.py), with its text encoder.
    kind = "builtin-text" if data.captions else "builtin"
    return base / f"{kind}-r{data.resolution}-n{data.builtin_images_per_class}-s{data.seed}"


def absolute_source(data: DataConfig) -> DataConfig:
    """``data.source`` absolute when it is a local path. (A relative ``data.labels_file`` is
    relative to ``data.source`` and stays as it is.)"""
    if data.source != "builtin" and _is_local(data.source):
        return data.model_copy(update={"source": _absolute(data.source)})
    return data


def resolve_data_source(data: DataConfig) -> DataConfig:
    """``absolute_source``, and ``builtin`` written as an image folder (once per machine and
    setting). On a cluster, whether this machine's disk may be used is decided once connected
    (orchestrator.cluster.rules.check_cluster_paths)."""
    data = absolute_source(data)
    if data.source != "builtin":
        return data
    if data.captions:
        from orchestrator.data.demo_text import write_captioned_demo

        root = write_captioned_demo(builtin_data_dir(data), data.builtin_images_per_class, data.resolution, data.seed)
        return data.model_copy(update={"source": str(root), "format": "imagefolder", "caption_column": "text"})
    root = write_demo_dataset(builtin_data_dir(data), data.builtin_images_per_class, data.resolution, data.seed)
    return data.model_copy(update={"source": str(root), "format": "imagefolder"})


def resolve_paths(cfg: TrainConfig) -> TrainConfig:
    """Make local paths absolute: Ray Train workers run in their own working directory, so a
    relative ``runs`` would land somewhere under Ray's session directory."""
    run = cfg.run
    if _is_local(run.storage):
        run = run.model_copy(update={"storage": _absolute(run.storage)})
    return cfg.model_copy(update={"run": run, "data": absolute_source(cfg.data)})


def resolve_data_config(cfg: TrainConfig) -> TrainConfig:
    """``resolve_paths``, with ``data.source=builtin`` turned into a real image folder, and
    ``model.text_encoder=builtin`` into the captioned demo's encoder directory."""
    cfg = resolve_paths(cfg)
    update = {"data": resolve_data_source(cfg.data)}
    if getattr(cfg.model, "text_encoder", None) == BUILTIN_TEXT_ENCODER:
        update["model"] = cfg.model.model_copy(update={"text_encoder": builtin_text_encoder(cfg.data)})
    return cfg.model_copy(update=update)


# model.text_encoder=builtin: the frozen encoder written with the captioned built-in data.
BUILTIN_TEXT_ENCODER = "builtin"


def builtin_text_encoder(data: DataConfig) -> str:
    """The directory of the built-in demo's text encoder (written with the data, once)."""
    if not (data.source == "builtin" and data.captions):
        raise ConfigError("model.text_encoder=builtin is the encoder of the captioned built-in data. Fix: set "
                          "data.source=builtin data.captions=true, or model.text_encoder to a local encoder directory")
    return str(resolve_data_source(data).source)
