"""Captions for text-to-image training (issue 20): where each format keeps them, and the
per-sample caption check shared by training (``CaptionSpec.check``) and ``raydiff data verify``.

Where captions come from (``data.caption_column``, default ``text``):

* image folders: ``metadata.jsonl`` / ``metadata.csv`` with ``file_name`` and the caption column,
  in any directory (``file_name`` relative to it; Hugging Face's imagefolder convention), or a
  ``.txt`` file beside the image (``a/b.png`` -> ``a/b.txt``; the metadata wins when both exist);
* WebDataset: the ``.<caption_column>`` member, else the ``.txt`` member (LAION's shards), else
  the ``caption_column`` field of the ``.json`` member;
* Parquet: the ``caption_column`` column (``datasets``' ``Dataset.to_parquet`` layout included).

A raw caption is a ``str`` (or the bytes of a ``.txt`` member), or ``None`` when the sample has
none. A missing, empty or all-whitespace caption is ``data.missing_caption``'s business: ``bad``
drops the sample (counted as ``missing_caption``), ``unconditional`` keeps it with the empty
prompt ``""`` (counted as ``uncaptioned_kept``), the input that classifier-free guidance uses
as its unconditional branch (Ho & Salimans 2022).
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from orchestrator.data import decode as D
from orchestrator.data.info import DataError

if TYPE_CHECKING:
    from orchestrator.config import DataConfig

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_EXT = ".txt"


def as_text(raw: Any) -> str | None:
    """A raw caption as text (``None`` when there is none or it is not text)."""
    if raw is None:
        return None
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return bytes(raw).decode("utf-8", "replace")
    if isinstance(raw, str):
        return raw
    return None


@dataclass(frozen=True)
class CaptionSpec:
    """Whether and how captions are read for one dataset (picklable, sent to decode tasks)."""

    use: bool
    column: str = "text"
    missing: str = "bad"

    @classmethod
    def for_config(cls, cfg: "DataConfig") -> "CaptionSpec":
        return cls(bool(cfg.captions), cfg.caption_column, cfg.missing_caption)

    def check(self, raw: Any) -> tuple[str, str | None, bool]:
        """``(caption, kind or None, keep)``: the stripped caption; a missing or empty one is
        ``("", "missing_caption", False)`` or, with ``missing="unconditional"``,
        ``("", "uncaptioned_kept", True)``."""
        text = as_text(raw)
        text = text.strip() if text is not None else ""
        if text:
            return text, None, True
        if self.missing == "unconditional":
            return "", D.UNCAPTIONED_KEPT, True
        return "", D.MISSING_CAPTION, False


def text_array(texts: Iterable[str]) -> np.ndarray:
    """Python strings as the numpy object array the batches carry under ``"text"``."""
    texts = [str(t) for t in texts]  # np.str_ from Arrow string columns -> str
    out = np.empty(len(texts), dtype=object)
    out[:] = texts
    return out


# ---------------------------------------------------------------------------------------------
# Image folders: metadata files and .txt files beside the images


def caption_file_for(image_rel: str) -> str:
    """``a/b.png`` -> ``a/b.txt``."""
    return posixpath.splitext(image_rel)[0] + CAPTION_EXT


def parse_metadata(name: str, raw: bytes, column: str) -> dict[str, Any]:
    """``{file_name: raw caption}`` of one ``metadata.jsonl`` / ``metadata.csv`` (file names as
    written, relative to the metadata file's directory). Rows without the caption column map to
    ``None``; a file without ``file_name`` is refused with the fix."""
    text = raw.decode("utf-8-sig", "replace")
    out: dict[str, Any] = {}
    if name.endswith(".jsonl"):
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{name} line {i + 1} is not JSON ({e}). Fix: one JSON object per line with "
                                f"\"file_name\" and {column!r}") from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise DataError(f"{name} line {i + 1} has no \"file_name\". Fix: one JSON object per line with "
                                f"\"file_name\" and {column!r} (Hugging Face imagefolder metadata)")
            out[str(row["file_name"])] = row.get(column)
    else:
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or "file_name" not in reader.fieldnames:
            raise DataError(f"{name} has no file_name column (columns: {', '.join(reader.fieldnames or [])}). "
                            f"Fix: a header row with file_name and {column!r} (Hugging Face imagefolder metadata)")
        for row in reader:
            out[row["file_name"]] = row.get(column)
    return out


def folder_captions(cfg: "DataConfig", images: list[str], listing: set[str], read: Any
                    ) -> tuple[tuple[Any, ...], tuple[str | None, ...]]:
    """Per image (in ``images`` order): ``(caption from a metadata file or None, the .txt file to
    read at decode time or None)``. ``read(rel) -> bytes`` reads one listed file (the metadata
    files are small and read here once; the per-image ``.txt`` files are read by the decode
    tasks, in parallel, like the images)."""
    meta: dict[str, Any] = {}
    # Deeper metadata files win over shallower ones for the same image (the nearest describes it).
    for rel in sorted((r for r in listing if posixpath.basename(r) in METADATA_FILES), key=lambda r: r.count("/")):
        base = posixpath.dirname(rel)
        rows = parse_metadata(rel, read(rel), cfg.caption_column)
        for fname, cap in rows.items():
            key = posixpath.normpath(posixpath.join(base, fname.removeprefix("./"))) if base else posixpath.normpath(fname.removeprefix("./"))
            meta[key] = cap
    captions = tuple(meta.get(p) for p in images)
    txt = tuple(caption_file_for(p) if p not in meta and caption_file_for(p) in listing else None for p in images)
    return captions, txt


# ---------------------------------------------------------------------------------------------
# Coverage, for `raydiff data verify` / `stats`


def coverage(raw_captions: Iterable[Any]) -> dict[str, Any]:
    """How many samples have a non-empty caption, and their length in words (min/median/max)."""
    n, words = 0, []
    for raw in raw_captions:
        n += 1
        t = (as_text(raw) or "").strip()
        if t:
            words.append(len(t.split()))
    out: dict[str, Any] = {"samples": n, "captioned": len(words), "coverage": len(words) / n if n else 0.0}
    if words:
        a = np.asarray(words)
        out["words"] = {"min": int(a.min()), "p50": float(np.median(a)), "max": int(a.max()), "mean": float(a.mean())}
    return out


def coverage_line(cov: dict[str, Any]) -> str:
    line = f"captions: {cov['captioned']} of {cov['samples']} samples ({cov['coverage']:.1%})"
    if "words" in cov:
        w = cov["words"]
        line += f", words min/median/max {w['min']}/{w['p50']:g}/{w['max']}"
    return line
