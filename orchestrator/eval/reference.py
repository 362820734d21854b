"""Reference images for FID/KID, read on this process without Ray: any data source and format
raydiff trains from (``pipeline.iter_samples``), decoded like training data at the checkpoint's
resolution, at most ``limit`` of them drawn uniformly at random (reservoir sampling over the
listing, so a class-sorted image folder is not cut to its first classes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from orchestrator.config import DataConfig
from orchestrator.data import DataError
from orchestrator.data.decode import decode_image, to_model_range
from orchestrator.data.labels import label_problem
from orchestrator.data.pipeline import inspect_dataset, iter_samples
from orchestrator.data.source import resolve_data_source
from orchestrator.storage import redact_uri


@dataclass
class Reference:
    images: torch.Tensor  # float32 [N, C, H, W] in [-1, 1]
    labels: torch.Tensor | None  # int64 [N], or None for unlabelled data
    class_names: tuple[str, ...] | None
    source: str
    skipped: int  # unreadable or unlabelled samples left out


def reference_data_config(data: DataConfig, reference: str | None) -> DataConfig:
    """The training data ``data`` (default) or ``reference``, with ``builtin`` written to disk."""
    if reference is not None:
        data = data.model_copy(update={"source": reference, "format": "auto", "labels_file": None})
    return resolve_data_source(data) if data.source == "builtin" else data


def load_reference(data: DataConfig, *, limit: int, seed: int = 0) -> Reference:
    info = inspect_dataset(data)
    rng = np.random.default_rng(seed)
    kept: list[tuple[bytes, object]] = []
    skipped = 0
    for i, (_name, blob, raw, _caption) in enumerate(iter_samples(data, info)):
        if isinstance(blob, str):
            skipped += 1  # a read failure, named by its kind
            continue
        if len(kept) < limit:
            kept.append((blob, raw))
        else:
            j = int(rng.integers(0, i + 1))
            if j < limit:
                kept[j] = (blob, raw)
    arrays, labels = [], []
    for blob, raw in kept:
        label = None
        if info.class_names is not None:
            label, problem = label_problem(raw, info)
            if problem:
                skipped += 1
                continue
        arr, _ = decode_image(blob, data.resolution, data.channels, data.center_crop)
        if arr is None:
            skipped += 1
            continue
        arrays.append(arr)
        labels.append(label)
    if len(arrays) < 2:
        raise DataError(f"{redact_uri(data.source)}: {len(arrays)} readable reference images; FID/KID need many "
                        "(thousands for FID). Fix: point --reference at the training data or a similar set")
    images = torch.from_numpy(to_model_range(np.stack(arrays)))
    lab = torch.tensor(labels, dtype=torch.long) if info.class_names is not None else None
    return Reference(images, lab, info.class_names, redact_uri(data.source), skipped)
