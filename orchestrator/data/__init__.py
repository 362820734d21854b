"""Training data, laid out by concern:

- ``pipeline.py``: listing, format detection, ``inspect_dataset``, ``build_train_dataset`` (Ray
  Data) and ``iter_samples``, with no per-format code;
- ``formats/``: one module per dataset format (imagefolder, webdataset, parquet) behind the
  ``DataFormat`` interface in ``formats/base.py``, registered by name in ``formats.FORMATS``;
- ``decode.py``: image decoding with per-sample error kinds; ``labels.py``: labels files and
  label checks; ``counter.py``: the bad-sample counter actor; ``info.py``: ``DataError``,
  ``DatasetInfo``;
- ``upload.py``: packing an image folder into WebDataset shards; ``check.py``: ``raydiff data
  verify``/``stats``; ``demo.py``: the built-in dataset.
"""

from orchestrator.data.counter import bad_sample_counts
from orchestrator.data.decode import CONVERTED_PREFIX, MIN_IMAGE_SIDE, RETRIED_READ, dropped
from orchestrator.data.formats import FORMATS, IMAGE_EXTS, MANIFEST_NAME, DataFormat, register_format
from orchestrator.data.info import DataError, DatasetInfo
from orchestrator.data.pipeline import build_train_dataset, inspect_dataset

__all__ = [
    "CONVERTED_PREFIX",
    "FORMATS",
    "IMAGE_EXTS",
    "MANIFEST_NAME",
    "MIN_IMAGE_SIDE",
    "RETRIED_READ",
    "dropped",
    "DataError",
    "DataFormat",
    "DatasetInfo",
    "bad_sample_counts",
    "build_train_dataset",
    "inspect_dataset",
    "register_format",
]
