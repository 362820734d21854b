"""parquet: ``*.parquet`` files with an image-bytes column (``data.image_column``; binary, or a
struct with a ``bytes`` field as Hugging Face writes it) and an optional label column
(``data.label_column``; class names from a Hugging Face ``ClassLabel`` feature when present),
and with ``data.captions`` a caption column (``data.caption_column``; what ``datasets`` writes
for an imagefolder with ``metadata.jsonl``: an ``image`` struct of ``bytes``/``path`` and ``text``).

A work unit is one row group, read by our own code (not ``ray.data.read_parquet``): bounded task
size, the same filesystem object as everywhere else, and a seeded shuffle of row groups.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa

from orchestrator import storage
from orchestrator.data import decode as D
from orchestrator.data.formats.base import DataFormat, DecodeContext, Listing, Sample, count, decode_chunks, ext, sample_ids
from orchestrator.data.formats.latents import TEXT_EMBEDDING_COLUMNS, has_text_embeddings, text_embeddings_of
from orchestrator.data.info import DataError, DatasetInfo
from orchestrator.data.labels import classes_from_values

if TYPE_CHECKING:
    import pyarrow as pa

    from orchestrator.config import DataConfig

log = logging.getLogger(__name__)


def _hf_class_names(meta: dict[bytes, bytes] | None, column: str) -> list[str] | None:
    """Class names of a Hugging Face ``ClassLabel`` column, stored in the schema metadata."""
    try:
        info = json.loads((meta or {})[b"huggingface"])
        feat = info["info"]["features"][column]
        return list(feat["names"]) if feat.get("_type") == "ClassLabel" else None
    except (KeyError, ValueError, TypeError):
        return None


def _cell_bytes(v: Any) -> bytes | None:
    if v is None:
        return None
    if isinstance(v, dict):  # Hugging Face Image feature: {"bytes": ..., "path": ...}
        return v.get("bytes")
    return bytes(v)


def _open(cfg: "DataConfig", fs: Any, root: str, rel: str) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(fs.open_input_file(f"{root}/{rel}"))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{storage.redact_uri(cfg.source)}/{rel} is not a readable Parquet file ({type(e).__name__}). Fix: remove or rewrite it") from None


def _label_column(cfg: "DataConfig", info: DatasetInfo) -> str | None:
    return cfg.label_column if (cfg.label_column and info.class_names is not None) else None


class Parquet(DataFormat):
    name = "parquet"
    description = ".parquet files"
    tie_rank = 1

    def detect(self, files: Listing) -> float:
        return sum(ext(rel) == ".parquet" for rel, _ in files)

    def inspect(self, cfg: "DataConfig", files: Listing) -> DatasetInfo:
        pfiles = sorted(rel for rel, _ in files if ext(rel) == ".parquet")
        if not pfiles:
            raise DataError(f"{storage.redact_uri(cfg.source)} holds no .parquet files. Fix: check data.format / data.source")
        fs, root = storage.filesystem_for(cfg.source, cfg.s3)
        n, values, hf_names = 0, [], None
        label_col = cfg.label_column
        for i, rel in enumerate(pfiles):
            pf = _open(cfg, fs, root, rel)
            cols = pf.schema_arrow.names
            if cfg.image_column not in cols:
                raise DataError(
                    f"{storage.redact_uri(cfg.source)}/{rel} has no column {cfg.image_column!r} (columns: {', '.join(cols)}). "
                    "Fix: set data.image_column to the column holding encoded image bytes"
                )
            if cfg.captions and cfg.caption_column not in cols:
                raise DataError(
                    f"{storage.redact_uri(cfg.source)}/{rel} has no caption column {cfg.caption_column!r} (columns: "
                    f"{', '.join(cols)}). Fix: set data.caption_column to the column holding the captions, or data.captions=false"
                )
            n += pf.metadata.num_rows
            if i == 0 and label_col and label_col not in cols:
                log.info("parquet dataset has no %r column: unlabeled", label_col)
                label_col = None
            if label_col:
                if hf_names is None:
                    hf_names = _hf_class_names(pf.schema_arrow.metadata, label_col)
                col = pf.read(columns=[label_col]).column(0)
                values.extend(v for v in col.to_pylist() if v is not None)
        if not label_col or not values:
            classes = None
        elif hf_names:
            classes = tuple(hf_names)
        else:
            classes = classes_from_values(sorted(set(values), key=str), f"column {label_col!r}")[0]
        return DatasetInfo(cfg.source, self.name, n, classes, tuple(pfiles))

    def units(self, cfg: "DataConfig", info: DatasetInfo, fs: Any, root: str) -> "pa.Table":
        paths, groups, rows = [], [], []
        for rel in info.files:
            meta = _open(cfg, fs, root, rel).metadata
            for rg in range(meta.num_row_groups):
                paths.append(rel)
                groups.append(rg)
                rows.append(meta.row_group(rg).num_rows)
        return pa.table({
            "unit": pa.array([f"{p}#{g}" for p, g in zip(paths, groups)], pa.string()),
            "path": pa.array(paths, pa.string()),
            "row_group": pa.array(groups, pa.int64()),
            "samples": pa.array(rows, pa.int64()),
        })

    def decode_options(self, cfg: "DataConfig", info: DatasetInfo) -> dict[str, Any]:
        fs, root = storage.filesystem_for(cfg.source, cfg.s3)
        # Shards written by `raydiff data encode --text-encoder` carry the captions' embeddings.
        embedded = bool(info.files) and has_text_embeddings(_open(cfg, fs, root, info.files[0]).schema_arrow)
        return {"image_col": cfg.image_column, "label_col": _label_column(cfg, info),
                "caption_col": cfg.caption_column if cfg.captions else None, "text_embeddings": embedded}

    def decode(self, batch: dict[str, np.ndarray], ctx: DecodeContext) -> Iterator[dict[str, np.ndarray]]:
        import pyarrow.parquet as pq

        fs = ctx.filesystem()
        image_col, label_col = ctx.options["image_col"], ctx.options["label_col"]
        caption_col = ctx.options.get("caption_col")
        embedded = ctx.options.get("text_embeddings", False)
        extra = [c for c in (label_col, caption_col) if c] + (list(TEXT_EMBEDDING_COLUMNS) if embedded else [])
        emb: dict[str, list[np.ndarray]] = {k: [] for k in TEXT_EMBEDDING_COLUMNS} if embedded else {}
        counts: dict[str, int] = {}
        blobs: list[Any] = []
        raw: list[Any] = []
        caps: list[Any] = []
        ids: list[int] = []
        for row, (rel, rg) in enumerate(zip(batch["path"], batch["row_group"])):
            def read(rel: str = rel, rg: int = int(rg)) -> Any:
                pf = pq.ParquetFile(fs.open_input_file(f"{ctx.root}/{rel}"))
                return pf.read_row_group(rg, columns=[image_col] + extra)

            try:
                t = storage.retry_call(read, max_attempts=max(ctx.read_attempts, 1), on_retry=lambda _e: count(counts, D.RETRIED_READ))
            except Exception:  # noqa: BLE001 - a broken row group drops its rows, not the run
                count(counts, D.READ_ERROR)
                continue
            js, row_ids = sample_ids(batch, row, t.num_rows)
            if len(js) < t.num_rows:
                t = t.take(js)
            blobs += [_cell_bytes(v) for v in t.column(image_col).to_pylist()]
            raw += t.column(label_col).to_pylist() if label_col else [None] * t.num_rows
            caps += t.column(caption_col).to_pylist() if caption_col else [None] * t.num_rows
            for k, v in text_embeddings_of(t).items():
                emb[k].append(v)
            ids += row_ids.tolist()
        extras = {k: np.concatenate(v) for k, v in emb.items() if v} or None
        yield from decode_chunks(blobs, raw, counts, ctx, ids, caps, extras)

    def iter_samples(self, cfg: "DataConfig", info: DatasetInfo, fs: Any, root: str, *, threads: int) -> Iterator[Sample]:
        import pyarrow.parquet as pq

        label_col = _label_column(cfg, info)
        caption_col = cfg.caption_column if cfg.captions else None
        cols = [cfg.image_column] + [c for c in (label_col, caption_col) if c]
        for rel in info.files:
            pf = pq.ParquetFile(fs.open_input_file(f"{root}/{rel}"))
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=cols):
                d = batch.to_pydict()
                labs = d[label_col] if label_col else [None] * batch.num_rows
                caps = d[caption_col] if caption_col else [None] * batch.num_rows
                for v, lab, cap in zip(d[cfg.image_column], labs, caps):
                    b = _cell_bytes(v)
                    yield f"{rel}:{row}", b if b is not None else D.EMPTY, lab, cap
                    row += 1
