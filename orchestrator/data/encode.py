"""``raydiff data encode``: images -> VAE latents and/or captions -> text embeddings, computed
once and written to a local directory or ``s3://bucket/prefix`` (the ``latents`` format with
``--vae``; Parquet images beside their embeddings with ``--text-encoder`` alone).

With ``--text-encoder DIR`` the source is read with its captions (``data.captions``) and a
``text_stage`` of ``TextEncoderActor`` actors (``text_encode.py``) (one GPU each when there are GPUs) runs the frozen
encoder (``model/text_encoder.py``) once per caption; the shards then hold ``text``,
``text_embedding`` [L, D] and ``text_mask`` [L] per sample, and training reads the embeddings
instead of running the encoder in every step (Ray's Stable Diffusion pre-training template and
MosaicML's diffusion do the same). Without ``--vae`` the images are stored as PNGs of the
decoded, centre-cropped ``--resolution`` images (lossless: training decodes the same pixels).

The pipeline:

1. any dataset raydiff reads (``build_train_dataset``: image folders, WebDataset, Parquet; local
   or S3), decoded, centre-cropped and resized to ``--resolution`` by CPU tasks, bad samples
   dropped and counted as in training;
2. ``latent_stage``: a Ray Data ``map_batches`` stage of ``VaeEncoder`` actors, each holding one
   ``AutoencoderKL`` loaded from a local directory (``local_files_only``; nothing is
   downloaded), one GPU per actor when the cluster has GPUs, else CPU;
3. the driver writes Parquet shards (``formats/latents.py`` describes them) as latents stream
   in, with a progress bar on a terminal, and ``latents.json`` last: a destination without it is
   not a dataset, so an interrupted encode is never trained on.

Latents are the posterior *mean*, times the VAE's ``scaling_factor`` (minus ``shift_factor``
first, for VAEs that have one). DiT's and fast-DiT's ``extract_features.py`` store one
``latent_dist.sample()`` instead; a sample drawn once and frozen is no augmentation (every epoch
sees the same draw), it only adds the posterior's noise (for SD's VAE a std of a few percent of
the latents' scale) and makes the stored bytes depend on a seed. The mean is deterministic: the
same images and VAE give the same shards, which the tests check against the VAE directly.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from orchestrator import storage
from orchestrator.data.counter import bad_sample_counts, release_counter, report
from orchestrator.data.formats.latents import LATENTS_MANIFEST, LATENTS_VERSION, ROW_GROUP_ROWS
from orchestrator.data.info import DataError
from orchestrator.data.labels import NO_LABEL
from orchestrator.data.pipeline import build_train_dataset, inspect_dataset
from orchestrator.data.text_encode import png_bytes, text_stage
from orchestrator.data.vae import VaeSpec, encode_mean, load_vae, resolve_vae

if TYPE_CHECKING:
    import ray.data

    from orchestrator.config import S3Config

log = logging.getLogger(__name__)

LatentDtype = Literal["float16", "float32"]
NON_FINITE = "non_finite_latent"


_PASS = ("text", "text_embedding", "text_mask")  # per-sample fields carried past the VAE


class VaeEncoder:
    """Ray Data class UDF: ``{"image": float32 [N, C, H, W] in [-1, 1], "label"}`` ->
    ``{"latent": [N, c, h, w] (dtype), "label"}`` (captions passed on). The VAE loads once per actor."""

    def __init__(self, path: str, scaling_factor: float, shift_factor: float | None, dtype: LatentDtype,
                 device: str, counter_name: str | None) -> None:
        import torch

        self.device = torch.device(device)
        self.vae = load_vae(path, self.device)
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.dtype = np.dtype(dtype)
        self.counter_name = counter_name

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device)
        z = encode_mean(self.vae, x, self.scaling_factor, self.shift_factor).float().cpu().numpy()
        # float16 overflows above 65504; a latent that is not finite would poison training.
        finite = np.isfinite(z.astype(self.dtype).reshape(len(z), -1)).all(axis=1)
        if not finite.all():
            report({NON_FINITE: int((~finite).sum())}, self.counter_name)
        return {"latent": z[finite].astype(self.dtype), "label": batch["label"][finite],
                **{k: batch[k][finite] for k in _PASS if k in batch}}


def latent_stage(ds: "ray.data.Dataset", vae: VaeSpec, *, batch_size: int, concurrency: int | None = None,
                 use_gpu: bool | None = None, scaling_factor: float | None = None, dtype: str = "float32",
                 counter_name: str | None = None) -> "ray.data.Dataset":
    """``ds`` (decoded images) mapped to latents by ``concurrency`` ``VaeEncoder`` actors: one GPU
    each when ``use_gpu`` (default: when the cluster has GPUs; then one actor per GPU), else one
    CPU each (default: one actor)."""
    import ray

    # With GPUs the decode tasks stay separate CPU tasks; on CPU Ray Data fuses them into the
    # actors (equal resources), which then decode and encode in turn.
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 if use_gpu is None else use_gpu
    n = concurrency or (max(gpus, 1) if use_gpu else 1)
    return ds.map_batches(
        VaeEncoder,
        fn_constructor_kwargs={
            "path": vae.path,
            "scaling_factor": vae.scaling_factor if scaling_factor is None else scaling_factor,
            "shift_factor": vae.shift_factor,
            "dtype": dtype,
            "device": "cuda" if use_gpu else "cpu",
            "counter_name": counter_name,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )


class _ShardWriter:
    """Buffers rows (a dict of per-sample arrays per batch) and writes ``part-NNNNN.parquet``
    shards of ``shard_rows`` rows: tensors as fixed-shape tensor columns, ``label`` int64 (or
    class names), ``text`` string, ``image`` binary (PNG)."""

    def __init__(self, dest: str, s3cfg: "S3Config | None", shard_rows: int) -> None:
        self.dest, self.s3cfg, self.shard_rows = dest, s3cfg, shard_rows
        self.fs, self.root = storage.filesystem_for(dest, s3cfg)
        if not storage.parse_uri(dest).is_s3:
            self.fs.create_dir(self.root, recursive=True)
        self.cols: dict[str, list[np.ndarray]] = {}
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, cols: dict[str, np.ndarray]) -> None:
        for k, v in cols.items():
            self.cols.setdefault(k, []).append(v)
        self.buffered += len(next(iter(cols.values())))
        while self.buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)

    def _flush(self, n: int) -> None:
        full = {k: np.concatenate(v) for k, v in self.cols.items()}
        self.cols = {k: [v[n:]] for k, v in full.items()}
        self.buffered -= n
        self._write({k: v[:n] for k, v in full.items()})

    def _write(self, cols: dict[str, np.ndarray]) -> None:
        name = f"part-{len(self.shards):05d}.parquet"
        arrays = {}
        for k, v in cols.items():
            if k == "label":
                arrays[k] = pa.array(v.tolist(), pa.string() if v.dtype == object else pa.int64())
            elif k == "text":
                arrays[k] = pa.array([str(t) for t in v], pa.string())
            elif k == "image":
                arrays[k] = pa.array(list(v), pa.binary())
            else:
                arrays[k] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(v))
        table = pa.table(arrays)
        try:
            with self.fs.open_output_stream(f"{self.root}/{name}") as f:
                pq.write_table(table, f, row_group_size=ROW_GROUP_ROWS)
        except OSError as e:
            uri = storage.redact_uri(storage.join(self.dest, name))
            raise storage.StorageError(f"cannot write {uri}: {e}. Fix: check DEST, its permissions and credentials") from None
        n = table.num_rows
        self.shards.append({"name": name, "num_samples": n,
                            "row_groups": [min(ROW_GROUP_ROWS, n - i) for i in range(0, n, ROW_GROUP_ROWS)]})


def _source_config(src: str, resolution: int, channels: int, batch_size: int, s3cfg: "S3Config | None",
                   data_options: dict[str, Any]):
    from orchestrator.config import DataConfig, S3Config

    opts = {k: v for k, v in data_options.items() if v is not None}
    # Every image once: nothing held out, labels kept whenever the source has them.
    return DataConfig(source=src, resolution=resolution, channels=channels, center_crop=True, conditional=True,
                      val_images=0, decode_batch_size=min(batch_size, 64), **opts).with_storage(s3cfg or S3Config())


EMBEDDINGS_MANIFEST = "embeddings.json"  # text-only encodes: what the Parquet shards hold


def encode(src: str, dest: str, *, vae: str | None = None, text_encoder: str | None = None,
           text_max_length: int | None = None, resolution: int = 256, batch_size: int = 32,
           scaling_factor: float | None = None, concurrency: int | None = None, dtype: LatentDtype = "float16",
           shard_rows: int = 4096, data_options: dict[str, Any] | None = None, s3cfg: "S3Config | None" = None,
           progress: bool = True, out=None) -> dict[str, Any]:
    """Encode every image of ``src`` to latents (``vae``) and/or every caption to text embeddings
    (``text_encoder``) under ``dest``; returns the manifest written as ``dest/latents.json``
    (with ``vae``) or ``dest/embeddings.json``. ``data_options``: ``format``, ``labels_file``,
    ``image_column``, ``label_column``, ``caption_column``, ``missing_caption`` of the source (as
    in ``DataConfig``)."""
    import ray

    out = out or sys.stdout
    if vae is None and text_encoder is None:
        raise DataError("nothing to encode. Fix: give --vae DIR (images -> latents), --text-encoder DIR "
                        "(captions -> embeddings), or both")
    spec = resolve_vae(vae) if vae is not None else None
    if scaling_factor is not None and not scaling_factor > 0:
        raise DataError(f"--scaling-factor {scaling_factor}: must be > 0. Fix: leave it out to use the VAE's"
                        + (f" ({spec.scaling_factor})" if spec else ""))
    text_info = None
    if text_encoder is not None:
        from model.text_encoder import encoder_info

        try:
            text_info = encoder_info(text_encoder)
        except (OSError, ValueError) as e:
            raise DataError(f"--text-encoder {text_encoder}: {e}. Fix: a directory saved with save_pretrained "
                            "(text model + tokenizer), e.g. the one `raydiff data make-demo --captions` writes") from None
    if spec is not None:
        if spec.in_channels not in (1, 3):
            raise DataError(f"--vae {vae}: the VAE takes {spec.in_channels}-channel images; raydiff decodes 1 or 3. Fix: use an RGB VAE")
        side = spec.latent_size(resolution)
        if resolution % spec.downsample or not 8 <= side or resolution > 1024:
            lo = 8 * spec.downsample
            raise DataError(f"--resolution {resolution}: this VAE downsamples {spec.downsample}x, so the resolution must be a "
                            f"multiple of {spec.downsample} from {lo} to 1024 (latents of 8 px or more, as data.resolution "
                            f"needs). Fix: e.g. --resolution {max(lo, resolution - resolution % spec.downsample)}")
    elif not 8 <= resolution <= 1024:
        raise DataError(f"--resolution {resolution}: must be from 8 to 1024 (data.resolution's range)")
    for name, v in (("--batch-size", batch_size), ("--shard-rows", shard_rows), ("--concurrency", concurrency or 1)):
        if v < 1:
            raise DataError(f"{name} {v}: must be at least 1")
    data_options = dict(data_options or {})
    if data_options.get("format") == "latents":
        raise DataError("--format latents: SRC must be an image dataset. Fix: --format auto, imagefolder, webdataset or parquet")
    if text_encoder is not None:
        data_options["captions"] = True
    cfg = _source_config(src, resolution, spec.in_channels if spec else 3, batch_size, s3cfg, data_options)
    info = inspect_dataset(cfg)
    if info.format == "latents":
        raise DataError(f"{storage.redact_uri(src)} already holds latents. Fix: encode the image dataset it came from")
    storage.check_writable(dest, cfg.s3)
    manifest_name = LATENTS_MANIFEST if spec is not None else EMBEDDINGS_MANIFEST
    # The old manifest goes first: until the new one is written, DEST is no dataset.
    storage.delete(storage.join(dest, manifest_name), cfg.s3)

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING,
                 logging_config=ray.LoggingConfig(log_level="ERROR"))
    counter_name = f"raydiff-encode-{uuid.uuid4().hex[:12]}"
    from ray.data import DataContext

    ctx = DataContext.get_current()
    bars = ctx.enable_progress_bars
    text_shape = None
    try:
        if progress:
            ctx.enable_progress_bars = False  # one bar: ours
        ds = build_train_dataset(cfg, info, counter_name=counter_name).drop_columns(["index"])
        if spec is not None:
            ds = latent_stage(ds, spec, batch_size=batch_size, concurrency=concurrency, scaling_factor=scaling_factor,
                              dtype=dtype, counter_name=counter_name)
        if text_encoder is not None:
            ds = text_stage(ds, text_encoder, batch_size=batch_size, max_length=text_max_length, concurrency=concurrency,
                            dtype=dtype)
        writer = _ShardWriter(dest, cfg.s3, shard_rows)
        class_counts: Counter[str] = Counter()
        bar = tqdm(total=info.num_samples, unit="img", desc="encode", disable=None if progress else True, file=sys.stderr)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            labels = batch["label"].astype(np.int64)
            if info.class_names is None:
                labels = np.full(len(labels), NO_LABEL, np.int64)
            else:
                class_counts.update(info.class_names[i] for i in labels.tolist())
            if spec is not None:
                cols: dict[str, np.ndarray] = {"latent": batch["latent"], "label": labels}
            else:
                # Parquet images: labels as class names (the Parquet reader's class names), none if unlabelled.
                cols = {"image": png_bytes(batch["image"])}
                if info.class_names is not None:
                    cols["label"] = np.asarray([info.class_names[i] for i in labels.tolist()], dtype=object)
            for k in _PASS:
                if k in batch:
                    cols[k] = batch[k]
            if "text_embedding" in cols:
                text_shape = list(cols["text_embedding"].shape[1:])
            writer.add(cols)
            bar.update(len(labels))
        writer.close()
        bar.close()
        skipped = bad_sample_counts(counter_name)
    finally:
        ctx.enable_progress_bars = bars
        release_counter(counter_name)
        if started:
            ray.shutdown()
    num = sum(s["num_samples"] for s in writer.shards)
    if num == 0:
        raise DataError(f"{storage.redact_uri(src)}: no image could be encoded (bad samples: {skipped}). "
                        "Fix: check the source with `raydiff data verify`")
    written = {s["name"] for s in writer.shards}
    for rel, _size in storage.list_files(dest, cfg.s3):
        if rel.startswith("part-") and rel.endswith(".parquet") and "/" not in rel and rel not in written:
            storage.delete(storage.join(dest, rel), cfg.s3)  # left by an earlier, larger encode
    text = None
    if text_encoder is not None:
        text = {"encoder": text_encoder, "type": text_info["type"], "hidden_size": text_info["hidden_size"],
                "shape": text_shape, "dtype": dtype, "columns": ["text", "text_embedding", "text_mask"]}
    manifest: dict[str, Any]
    if spec is not None:
        side = spec.latent_size(resolution)
        manifest = {
            "format": "latents",
            "version": LATENTS_VERSION,
            "num_samples": num,
            "shape": [spec.latent_channels, side, side],
            "dtype": dtype,
            "latent": "mean",
            "scaling_factor": spec.scaling_factor if scaling_factor is None else float(scaling_factor),
            "shift_factor": spec.shift_factor,
            "image_resolution": resolution,
            "vae": {"path": spec.path, "class": "AutoencoderKL", "config_sha256": spec.config_sha256,
                    "latent_channels": spec.latent_channels, "downsample": spec.downsample},
        }
        train = f"data.source={storage.redact_uri(dest)} data.format=latents data.resolution={side}"
        what = f"{num} latents of shape {manifest['shape']} ({dtype})"
    else:
        manifest = {"format": "parquet", "num_samples": num, "image_resolution": resolution, "image_column": "image"}
        train = f"data.source={storage.redact_uri(dest)} data.format=parquet data.resolution={resolution}"
        what = f"{num} images ({resolution} px PNG)"
    manifest.update({
        "text": text,
        "classes": list(info.class_names) if info.class_names else None,
        "class_counts": dict(sorted(class_counts.items())),
        "source": storage.redact_uri(src),
        "source_format": info.format,
        "bad_samples": skipped,
        "shards": writer.shards,
        "created_by": "raydiff data encode",
    })
    storage.write_bytes(storage.join(dest, manifest_name), json.dumps(manifest, indent=1).encode(), cfg.s3)
    if text is not None:
        what += f" with caption embeddings of shape {text_shape}"
    print(
        f"{storage.redact_uri(dest)}: {what} in {len(writer.shards)} shard(s), {len(info.class_names or ())} classes"
        + (f"; bad samples: {', '.join(f'{k}={v}' for k, v in sorted(skipped.items()))}" if skipped else "")
        + f". Train with: {train}",
        file=out,
    )
    return manifest
