"""latents: VAE latents written by ``raydiff data encode`` (``orchestrator/data/encode.py``):
``part-*.parquet`` shards with a fixed-shape tensor column ``latent`` (Arrow's canonical
``arrow.fixed_shape_tensor``, float16 or float32, shape ``[C, h, w]``) and an int64 ``label``
(-1 = none), plus ``latents.json``: count, shape, dtype, scaling factor, the VAE's path and
config hash, class names, source, and each shard's row groups.

The manifest has its own name because ``webdataset`` claims any ``manifest.json`` and ``detect``
sees file names only; ``latents.json`` makes detection unambiguous, and only the shards it lists
are read (a half-written re-encode leaves no manifest, so it is never mistaken for data).

Samples are ``{"image": float32 [C, h, w], "label": int64}``: the latent as stored (already
multiplied by the scaling factor), with no decoding or resizing. The trainer's random horizontal
flip stays valid: a convolutional VAE encodes a mirrored image to (approximately) the mirrored
latent. ``data.channels``/``data.resolution`` must equal the latent shape (checked in ``units``,
i.e. when training reads the data, with the values to set); ``raydiff data verify``/``stats``
see each latent as a small PNG preview of its first three channels.

A work unit is one Parquet row group (``ROW_GROUP_ROWS`` latents as ``encode`` writes them).
"""

from __future__ import annotations

import io
import json
import math
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
from PIL import Image

from orchestrator import storage
from orchestrator.data import decode as D
from orchestrator.data.counter import report
from orchestrator.data.formats.base import DataFormat, DecodeContext, Listing, Sample, count, sample_ids
from orchestrator.data.info import DataError, DatasetInfo

if TYPE_CHECKING:
    import pyarrow as pa

    from orchestrator.config import DataConfig, S3Config

LATENTS_MANIFEST = "latents.json"
LATENTS_VERSION = 1
ROW_GROUP_ROWS = 256
# Scaled latents are roughly unit-variance: previews map [-PREVIEW_RANGE, PREVIEW_RANGE] to
# black..white (a fixed range, so that previews of different steps compare).
PREVIEW_RANGE = 3.0
_FIX = "Fix: run `raydiff data encode SRC DEST --vae PATH` and point data.source at DEST"


def read_manifest(source: str, s3cfg: "S3Config | None" = None) -> dict[str, Any]:
    """The checked ``latents.json`` under ``source``; ``DataError`` with the fix otherwise."""
    uri = storage.join(source, LATENTS_MANIFEST)
    try:
        m = json.loads(storage.read_bytes(uri, s3cfg))
    except FileNotFoundError:
        raise DataError(f"{storage.redact_uri(source)} has no {LATENTS_MANIFEST}. {_FIX}") from None
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    except ValueError as e:
        raise DataError(f"{storage.redact_uri(uri)} is not valid JSON ({e}). {_FIX}") from None
    try:
        ok = (m["format"] == "latents" and int(m["version"]) <= LATENTS_VERSION and len(m["shape"]) == 3
              and m["dtype"] in ("float16", "float32") and float(m["scaling_factor"]) > 0
              and sum(int(s["num_samples"]) for s in m["shards"]) == int(m["num_samples"])
              and all(sum(map(int, s["row_groups"])) == int(s["num_samples"]) for s in m["shards"]))
    except (KeyError, TypeError, ValueError) as e:
        ok, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "inconsistent fields"
    if not ok:
        raise DataError(f"{storage.redact_uri(uri)} is not a raydiff latents manifest ({why}). {_FIX}")
    return m


def latents_of(column: "pa.ChunkedArray | pa.Array") -> np.ndarray:
    """``[N, C, h, w]`` from a fixed-shape tensor column (its stored dtype)."""
    chunks = [c.to_numpy_ndarray() for c in getattr(column, "chunks", [column])]
    return np.concatenate(chunks) if chunks else np.zeros((0,) + tuple(column.type.shape), column.type.value_type.to_pandas_dtype())


# Precomputed text embeddings (`raydiff data encode --text-encoder`): fixed-shape tensor columns
# text_embedding [L, D] (float16/32) and text_mask [L] (uint8, 1 at real tokens), beside the
# latents or the images; the readers hand them on as float32 / bool.
TEXT_EMBEDDING_COLUMNS = ("text_embedding", "text_mask")


def text_embeddings_of(table: "pa.Table") -> dict[str, np.ndarray]:
    """``{"text_embedding": float32 [N, L, D], "text_mask": bool [N, L]}`` from a table holding
    the columns (``{}`` when it holds none)."""
    if not all(c in table.column_names for c in TEXT_EMBEDDING_COLUMNS):
        return {}
    return {"text_embedding": latents_of(table.column("text_embedding")).astype(np.float32),
            "text_mask": latents_of(table.column("text_mask")).astype(bool)}


def has_text_embeddings(schema: "pa.Schema") -> bool:
    return all(c in schema.names for c in TEXT_EMBEDDING_COLUMNS)


def preview_uint8(latents: np.ndarray) -> np.ndarray:
    """``[N, C, h, w]`` latents -> ``[N, h, w, 3]`` uint8: the first three channels (fewer are
    repeated) mapped from [-PREVIEW_RANGE, PREVIEW_RANGE]."""
    x = latents[:, [min(i, latents.shape[1] - 1) for i in range(3)]].astype(np.float32)
    x = np.clip((x / PREVIEW_RANGE + 1) * 127.5, 0, 255).round().astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def _check_fits(cfg: "DataConfig", m: dict[str, Any]) -> None:
    c, h, w = (int(v) for v in m["shape"])
    if (cfg.format, cfg.channels, cfg.resolution, cfg.resolution) == ("latents", c, h, w):
        return
    if c not in (1, 3, 4):
        raise DataError(f"{storage.redact_uri(cfg.source)} holds latents with {c} channels; data.channels allows 1, 3 or 4. "
                        "Fix: encode with a VAE of 4 latent channels (Stable Diffusion's)")
    fix = [k for k, bad in (("data.format=latents", cfg.format != "latents"), (f"data.channels={c}", cfg.channels != c),
                            (f"data.resolution={h}", cfg.resolution != h)) if bad]
    raise DataError(
        f"{storage.redact_uri(cfg.source)} holds VAE latents of shape [{c}, {h}, {w}] ({m.get('image_resolution')} px "
        f"images encoded) but data.format={cfg.format} data.channels={cfg.channels} data.resolution={cfg.resolution}. "
        f"Fix: set {' '.join(fix)} (the model trains on the latents; data.resolution is the latent size)"
    )


class Latents(DataFormat):
    name = "latents"
    description = f"VAE latents ({LATENTS_MANIFEST} from `raydiff data encode`)"
    # Its manifest is conclusive; rank above parquet (its shards are .parquet files too).
    tie_rank = 3

    def detect(self, files: Listing) -> float:
        return float("inf") if any(rel == LATENTS_MANIFEST for rel, _ in files) else 0

    def inspect(self, cfg: "DataConfig", files: Listing) -> DatasetInfo:
        m = read_manifest(cfg.source, cfg.s3)
        present = {rel for rel, _ in files}
        missing = [s["name"] for s in m["shards"] if s["name"] not in present]
        if missing:
            raise DataError(f"{storage.redact_uri(cfg.source)}: {LATENTS_MANIFEST} lists {len(missing)} missing shard(s), "
                            f"e.g. {missing[0]}. Fix: re-run `raydiff data encode` into this destination")
        classes = m.get("classes")
        return DatasetInfo(cfg.source, self.name, int(m["num_samples"]), tuple(classes) if classes else None,
                           tuple(s["name"] for s in m["shards"]))

    def units(self, cfg: "DataConfig", info: DatasetInfo, fs: Any, root: str) -> "pa.Table":
        m = read_manifest(cfg.source, cfg.s3)
        _check_fits(cfg, m)
        rows = [(s["name"], g, int(n)) for s in m["shards"] for g, n in enumerate(s["row_groups"])]
        return pa.table({
            "unit": pa.array([f"{p}#{g}" for p, g, _ in rows], pa.string()),
            "path": pa.array([p for p, _, _ in rows], pa.string()),
            "row_group": pa.array([g for _, g, _ in rows], pa.int64()),
            "samples": pa.array([n for _, _, n in rows], pa.int64()),
        })

    def units_per_block(self, cfg: "DataConfig", num_units: int) -> int:
        import ray

        # As for image folders: about one block per CPU, at most ~64 MiB of float32 output each.
        cpus = int(ray.cluster_resources().get("CPU", 4)) if ray.is_initialized() else 4
        group_bytes = ROW_GROUP_ROWS * 4 * cfg.channels * cfg.resolution**2
        return max(1, min((64 << 20) // group_bytes, math.ceil(num_units / max(cpus, 1))))

    def decode_options(self, cfg: "DataConfig", info: DatasetInfo) -> dict[str, Any]:
        return {"text_embeddings": bool(read_manifest(cfg.source, cfg.s3).get("text"))}

    def decode(self, batch: dict[str, np.ndarray], ctx: DecodeContext) -> Iterator[dict[str, np.ndarray]]:
        import pyarrow.parquet as pq

        fs = ctx.filesystem()
        shape = (ctx.channels, ctx.resolution, ctx.resolution)
        counts: dict[str, int] = {}
        images: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        indices: list[np.ndarray] = []
        emb: dict[str, list[np.ndarray]] = {k: [] for k in TEXT_EMBEDDING_COLUMNS}
        columns = ["latent", "label"] + (list(TEXT_EMBEDDING_COLUMNS) if ctx.options.get("text_embeddings") else [])
        for row, (rel, rg) in enumerate(zip(batch["path"], batch["row_group"])):
            def read(rel: str = rel, rg: int = int(rg)) -> Any:
                return pq.ParquetFile(fs.open_input_file(f"{ctx.root}/{rel}")).read_row_group(rg, columns=columns)

            try:
                t = storage.retry_call(read, max_attempts=max(ctx.read_attempts, 1), on_retry=lambda _e: count(counts, D.RETRIED_READ))
                lat = latents_of(t.column("latent"))
            except Exception:  # noqa: BLE001 - a broken row group drops its rows, not the run
                count(counts, D.READ_ERROR)
                continue
            if lat.shape[1:] != shape:  # a shard from another encode copied in by hand
                counts[D.CORRUPT] = counts.get(D.CORRUPT, 0) + len(lat)
                continue
            js, row_ids = sample_ids(batch, row, len(lat))
            keep, labs, kept_ids = [], [], []
            raws = t.column("label").to_pylist()
            for i, sid in zip(js.tolist(), row_ids.tolist()):
                label, bad = ctx.labels.check(raws[i])
                if bad is None:
                    keep.append(i)
                    labs.append(label)
                    kept_ids.append(sid)
                else:
                    count(counts, bad)
            images.append(lat[keep].astype(np.float32))
            labels.append(np.asarray(labs, np.int64))
            indices.append(np.asarray(kept_ids, np.int64))
            for k, v in text_embeddings_of(t).items():
                emb[k].append(v[keep])
        report(counts, ctx.counter_name)
        out = np.concatenate(images) if images else np.zeros((0, *shape), np.float32)
        lab = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        idx = np.concatenate(indices) if indices else np.zeros(0, np.int64)
        text = {k: np.concatenate(v) for k, v in emb.items() if v}
        for i in range(0, max(len(out), 1), ctx.chunk):  # at least one (possibly empty) chunk
            yield {"image": out[i : i + ctx.chunk], "label": lab[i : i + ctx.chunk], "index": idx[i : i + ctx.chunk],
                   **{k: v[i : i + ctx.chunk] for k, v in text.items()}}

    def iter_samples(self, cfg: "DataConfig", info: DatasetInfo, fs: Any, root: str, *, threads: int) -> Iterator[Sample]:
        import pyarrow.parquet as pq

        for rel in info.files:
            try:
                pf = pq.ParquetFile(fs.open_input_file(f"{root}/{rel}"))
                with_text = "text" in pf.schema_arrow.names  # captions stored by encode --text-encoder
                batches = pf.iter_batches(batch_size=ROW_GROUP_ROWS, columns=["latent", "label"] + (["text"] if with_text else []))
                row = 0
                for b in batches:
                    lat = latents_of(b.column("latent"))
                    finite = np.isfinite(lat.reshape(len(lat), -1)).all(axis=1)
                    previews = preview_uint8(np.nan_to_num(lat))
                    texts = b.column("text").to_pylist() if with_text and cfg.captions else [None] * len(lat)
                    for j, lab in enumerate(b.column("label").to_pylist()):
                        if finite[j]:
                            buf = io.BytesIO()
                            Image.fromarray(previews[j]).save(buf, format="PNG")
                            yield f"{rel}:{row}", buf.getvalue(), lab, texts[j]
                        else:
                            yield f"{rel}:{row}", D.CORRUPT, lab, texts[j]
                        row += 1
            except OSError:
                yield rel, D.READ_ERROR, None, None

