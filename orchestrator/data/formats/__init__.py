"""The registry of dataset formats: ``data.format`` name -> ``DataFormat`` object.

Adding a format means one module with a ``DataFormat`` subclass (see ``base.py``) and one
``register_format`` line below (or a call from user code before ``inspect_dataset``); the
pipeline, ``raydiff data`` and the benchmark need no change. ``format: auto`` asks every
registered format's ``detect`` and picks the highest score.

``orchestrator/config.py`` spells the built-in names out as a ``Literal`` for validation; a test
keeps the two in step.
"""

from __future__ import annotations

from orchestrator.data.formats.base import DataFormat, DecodeContext
from orchestrator.data.formats.imagefolder import IMAGE_EXTS, ImageFolder
from orchestrator.data.formats.latents import Latents
from orchestrator.data.formats.parquet import Parquet
from orchestrator.data.formats.webdataset import MANIFEST_NAME, WebDataset
from orchestrator.data.info import DataError

FORMATS: dict[str, DataFormat] = {}


def register_format(fmt: DataFormat, *, replace: bool = False) -> DataFormat:
    """Make ``fmt`` available as ``data.format=<fmt.name>`` and to ``format: auto``."""
    if fmt.name in FORMATS and not replace and FORMATS[fmt.name] is not fmt:
        raise ValueError(f"a dataset format named {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> DataFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise DataError(f"unknown dataset format {name!r} (registered: {', '.join(FORMATS)})") from None


register_format(ImageFolder())
register_format(WebDataset())
register_format(Parquet())
register_format(Latents())

__all__ = ["FORMATS", "IMAGE_EXTS", "MANIFEST_NAME", "DataFormat", "DecodeContext", "get_format", "register_format"]
