"""A metrics record (train/metrics.py, plus the worker's additions) as flat scalars.

The tags group related curves on TensorBoard's dashboard (``train/``, ``loss_per_t_bin/``,
``perf/``, ``precision/``, ``data/``, ``val/``); MLflow and W&B get the same names.
"""

from __future__ import annotations

import math
from typing import Any

# record key -> tag, for keys holding one number.
_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "ema_decay": "train/ema_decay",
    "nonfinite": "train/nonfinite",
    "loss_scale": "precision/loss_scale",
    "overflow_skipped_steps": "precision/overflow_skipped_steps",
    "images_per_s": "perf/images_per_s",
    "mfu": "perf/mfu",
    "data_wait_share": "perf/data_wait_share",
    "samples_seen": "progress/samples_seen",
    "epoch": "progress/epoch",
    "storage_retries": "storage/retries",
    "val_loss": "val/loss",
}


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def scalars_of(rec: dict[str, Any]) -> dict[str, float]:
    """The record's numbers by tag; missing, None and non-finite values are left out (a NaN loss
    is reported by the divergence guard, and would blank TensorBoard's axis scaling)."""
    out: dict[str, float] = {}
    for key, tag in _TAGS.items():
        v = _number(rec.get(key))
        if v is not None:
            out[tag] = v
    for i, v in enumerate(rec.get("loss_per_t_bin") or []):
        v = _number(v)
        if v is not None:
            out[f"loss_per_t_bin/{i:02d}"] = v
    bad = rec.get("bad_samples")
    if isinstance(bad, dict):
        # converted_from_* are kept samples and retried_read are retried reads (data/counter.py):
        # only the other kinds were skipped.
        skipped = {k: v for k, v in bad.items() if not k.startswith("converted_from_") and k != "retried_read"}
        out["data/skipped_samples"] = float(sum(skipped.values()))
        for k, v in bad.items():
            out[f"data/{k}"] = float(v)
    return out
