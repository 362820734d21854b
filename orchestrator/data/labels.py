"""Labels: ``data.labels_file`` for flat image folders, class names from raw label values, and
the per-sample label check shared by training (``LabelSpec.check``) and ``raydiff data verify``.

Raw labels come in per format: a class index (image folders, ``.cls``), a class name or an int
from JSON, a Parquet cell, ``NO_LABEL`` or ``None`` for "no label", or ``decode.INVALID_LABEL``
for an unparseable label member.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from orchestrator import storage
from orchestrator.data import decode as D
from orchestrator.data.info import DataError, DatasetInfo

if TYPE_CHECKING:
    from orchestrator.config import DataConfig

# Raw label stored for a sample that has none (dropped when training conditionally).
NO_LABEL = -1


def read_labels_file(cfg: "DataConfig") -> dict[str, Any]:
    """``{relative path: raw label}`` from ``data.labels_file`` (CSV ``path,label`` with an
    optional header, JSON ``{path: label}`` or ``[{"path":..., "label":...}]``)."""
    assert cfg.labels_file is not None
    uri = cfg.labels_file
    if "://" not in uri and not uri.startswith("/"):
        uri = storage.join(cfg.source, uri)
    try:
        raw = storage.read_bytes(uri, cfg.s3).decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"data.labels_file={cfg.labels_file!r} not found at {storage.redact_uri(uri)}. Fix: give a path relative to data.source or a full URI") from None
    except storage.StorageError as e:
        raise DataError(f"data.labels_file: {e}") from None
    out: dict[str, Any] = {}
    if uri.lower().endswith(".json"):
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"data.labels_file={cfg.labels_file!r} is not valid JSON ({e}). Fix: write {{\"path\": label}} or [{{\"path\":..., \"label\":...}}]") from None
        if isinstance(obj, dict):
            out = dict(obj)
        elif isinstance(obj, list) and all(isinstance(r, dict) and "path" in r and "label" in r for r in obj):
            out = {r["path"]: r["label"] for r in obj}
        else:
            raise DataError(f"data.labels_file={cfg.labels_file!r}: expected {{path: label}} or a list of {{\"path\", \"label\"}} objects")
    else:
        rows = [r for r in csv.reader(io.StringIO(raw)) if r and any(c.strip() for c in r)]
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
            rows = rows[1:]
        for i, r in enumerate(rows):
            if len(r) < 2:
                raise DataError(f"data.labels_file={cfg.labels_file!r} line {i + 1}: expected 'path,label', got {r!r}")
            out[r[0].strip()] = r[1].strip()
    return {k.removeprefix("./"): v for k, v in out.items()}


def classes_from_values(values: list[Any], what: str) -> tuple[tuple[str, ...], dict[Any, int]]:
    """Class names and a value->index map from raw label values (ints, digit strings or names)."""
    def as_int(v: Any) -> int | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        return None

    ints = [as_int(v) for v in values]
    if all(i is not None for i in ints):
        hi = max((i for i in ints if i is not None), default=-1)
        return tuple(str(i) for i in range(hi + 1)), {v: i for v, i in zip(values, ints)}
    if any(i is not None for i in ints):
        raise DataError(f"{what} mixes integer labels and class names. Fix: use one kind throughout")
    names = tuple(sorted({str(v) for v in values}))
    index = {n: i for i, n in enumerate(names)}
    return names, {v: index[str(v)] for v in values}


@dataclass(frozen=True)
class LabelSpec:
    """How raw labels become class indices for one dataset (picklable, sent to decode tasks)."""

    use_labels: bool
    num_classes: int
    class_index: dict[str, int] | None

    @classmethod
    def for_info(cls, info: DatasetInfo, use_labels: bool) -> "LabelSpec":
        names = info.class_names
        return cls(use_labels, info.num_classes or 0, {n: i for i, n in enumerate(names)} if names else None)

    def check(self, raw: Any) -> tuple[int, str | None]:
        """(class index, None) or (0, bad kind). Labels are ignored for unconditional training."""
        if not self.use_labels:
            return 0, None
        if raw is None or (isinstance(raw, (int, np.integer)) and raw == NO_LABEL):
            return 0, D.MISSING_LABEL
        if raw == D.INVALID_LABEL:
            return 0, D.INVALID_LABEL
        if isinstance(raw, str) and not raw.lstrip("-").isdigit():
            if self.class_index is None or raw not in self.class_index:
                return 0, D.UNKNOWN_LABEL
            return self.class_index[raw], None
        idx = int(raw)
        if not 0 <= idx < self.num_classes:
            return 0, D.LABEL_OUT_OF_RANGE
        return idx, None


def label_problem(raw: Any, info: DatasetInfo) -> tuple[int, str | None]:
    """(class index, None) or (0, bad kind) for a raw label of a labeled dataset."""
    return LabelSpec.for_info(info, use_labels=info.class_names is not None).check(raw)
