"""Dataset listing, decoding and the Ray Data training pipeline (see ``pipeline.py``)."""

from orchestrator.data.decode import CONVERTED_PREFIX, MIN_IMAGE_SIDE, RETRIED_READ, dropped
from orchestrator.data.pipeline import (
    IMAGE_EXTS,
    MANIFEST_NAME,
    DataError,
    DatasetInfo,
    bad_sample_counts,
    build_train_dataset,
    inspect_dataset,
)

__all__ = [
    "CONVERTED_PREFIX",
    "IMAGE_EXTS",
    "MANIFEST_NAME",
    "MIN_IMAGE_SIDE",
    "RETRIED_READ",
    "dropped",
    "DataError",
    "DatasetInfo",
    "bad_sample_counts",
    "build_train_dataset",
    "inspect_dataset",
]
