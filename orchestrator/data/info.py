"""The two types every data module shares: ``DataError`` and ``DatasetInfo``.

They live apart from the pipeline and the formats so that labels, formats and pipeline can all
import them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """The dataset cannot be used; raised before training with the URI and the likely fix."""


@dataclass(frozen=True)
class DatasetInfo:
    source: str
    format: str
    num_samples: int
    class_names: tuple[str, ...] | None
    # What build_train_dataset needs so that it does not list the store again. Paths are
    # relative to the source root: imagefolder = image files, webdataset = shards,
    # parquet = parquet files. ``labels`` are raw class indices per file (imagefolder only).
    files: tuple[str, ...] = field(default=(), repr=False, compare=False)
    labels: tuple[int, ...] | None = field(default=None, repr=False, compare=False)
    # Samples per file where a file holds several and the count is known from the listing
    # (webdataset: from the manifest or the one pass of ``inspect``); the exact data position
    # (data/position.py) counts them.
    unit_samples: tuple[int, ...] | None = field(default=None, repr=False, compare=False)
    # Image folders read with data.captions (orchestrator/data/captions.py), per file: the raw
    # caption from a metadata file (or None), and the .txt file beside it to read instead (or None).
    captions: tuple[object, ...] | None = field(default=None, repr=False, compare=False)
    caption_files: tuple[str | None, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)
