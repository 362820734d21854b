"""``raydiff data encode``: images -> VAE latents, computed once and written to a local
directory or ``s3://bucket/prefix`` for latent-diffusion training (the ``latents`` format).

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
from orchestrator.data.counter import bad_sample_counts, counter, report
from orchestrator.data.formats.latents import LATENTS_MANIFEST, LATENTS_VERSION, ROW_GROUP_ROWS
from orchestrator.data.info import DataError
from orchestrator.data.labels import NO_LABEL
from orchestrator.data.pipeline import build_train_dataset, inspect_dataset
from orchestrator.data.vae import VaeSpec, encode_mean, load_vae, resolve_vae

if TYPE_CHECKING:
    import ray.data

    from orchestrator.config import S3Config

log = logging.getLogger(__name__)

LatentDtype = Literal["float16", "float32"]
NON_FINITE = "non_finite_latent"


class VaeEncoder:
    """Ray Data class UDF: ``{"image": float32 [N, C, H, W] in [-1, 1], "label"}`` ->
    ``{"latent": [N, c, h, w] (dtype), "label"}``. The VAE loads once per actor."""

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
        return {"latent": z[finite].astype(self.dtype), "label": batch["label"][finite]}


def latent_stage(ds: "ray.data.Dataset", vae: VaeSpec, *, batch_size: int, concurrency: int | None = None,
                 use_gpu: bool | None = None, scaling_factor: float | None = None, dtype: LatentDtype = "float32",
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
    """Buffers latents and writes ``part-NNNNN.parquet`` shards of ``shard_rows`` rows."""

    def __init__(self, dest: str, s3cfg: "S3Config | None", shard_rows: int) -> None:
        self.dest, self.s3cfg, self.shard_rows = dest, s3cfg, shard_rows
        self.fs, self.root = storage.filesystem_for(dest, s3cfg)
        if not storage.parse_uri(dest).is_s3:
            self.fs.create_dir(self.root, recursive=True)
        self.latents: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, latents: np.ndarray, labels: np.ndarray) -> None:
        self.latents.append(latents)
        self.labels.append(labels)
        self.buffered += len(latents)
        while self.buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)

    def _flush(self, n: int) -> None:
        lat, lab = np.concatenate(self.latents), np.concatenate(self.labels)
        self.latents, self.labels, self.buffered = [lat[n:]], [lab[n:]], len(lat) - n
        self._write(lat[:n], lab[:n])

    def _write(self, lat: np.ndarray, lab: np.ndarray) -> None:
        name = f"part-{len(self.shards):05d}.parquet"
        table = pa.table({
            "latent": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(lat)),
            "label": pa.array(lab, pa.int64()),
        })
        try:
            with self.fs.open_output_stream(f"{self.root}/{name}") as f:
                pq.write_table(table, f, row_group_size=ROW_GROUP_ROWS)
        except OSError as e:
            uri = storage.redact_uri(storage.join(self.dest, name))
            raise storage.StorageError(f"cannot write {uri}: {e}. Fix: check DEST, its permissions and credentials") from None
        n = len(lat)
        self.shards.append({"name": name, "num_samples": n,
                            "row_groups": [min(ROW_GROUP_ROWS, n - i) for i in range(0, n, ROW_GROUP_ROWS)]})


def _source_config(src: str, resolution: int, channels: int, batch_size: int, s3cfg: "S3Config | None",
                   data_options: dict[str, Any]):
    from orchestrator.config import DataConfig, S3Config

    opts = {k: v for k, v in data_options.items() if v is not None}
    # Every image once: nothing held out, labels kept whenever the source has them.
    return DataConfig(source=src, resolution=resolution, channels=channels, center_crop=True, conditional=True,
                      val_images=0, decode_batch_size=min(batch_size, 64), **opts).with_storage(s3cfg or S3Config())


def encode(src: str, dest: str, *, vae: str, resolution: int = 256, batch_size: int = 32,
           scaling_factor: float | None = None, concurrency: int | None = None, dtype: LatentDtype = "float16",
           shard_rows: int = 4096, data_options: dict[str, Any] | None = None, s3cfg: "S3Config | None" = None,
           progress: bool = True, out=None) -> dict[str, Any]:
    """Encode every image of ``src`` to latents under ``dest``; returns the manifest written as
    ``dest/latents.json``. ``data_options``: ``format``, ``labels_file``, ``image_column``,
    ``label_column`` of the source (as in ``DataConfig``)."""
    import ray

    out = out or sys.stdout
    spec = resolve_vae(vae)
    if scaling_factor is not None and not scaling_factor > 0:
        raise DataError(f"--scaling-factor {scaling_factor}: must be > 0. Fix: leave it out to use the VAE's ({spec.scaling_factor})")
    if spec.in_channels not in (1, 3):
        raise DataError(f"--vae {vae}: the VAE takes {spec.in_channels}-channel images; raydiff decodes 1 or 3. Fix: use an RGB VAE")
    side = spec.latent_size(resolution)
    if resolution % spec.downsample or not 8 <= side or resolution > 1024:
        lo = 8 * spec.downsample
        raise DataError(f"--resolution {resolution}: this VAE downsamples {spec.downsample}x, so the resolution must be a "
                        f"multiple of {spec.downsample} from {lo} to 1024 (latents of 8 px or more, as data.resolution "
                        f"needs). Fix: e.g. --resolution {max(lo, resolution - resolution % spec.downsample)}")
    for name, v in (("--batch-size", batch_size), ("--shard-rows", shard_rows), ("--concurrency", concurrency or 1)):
        if v < 1:
            raise DataError(f"{name} {v}: must be at least 1")
    data_options = data_options or {}
    if data_options.get("format") == "latents":
        raise DataError("--format latents: SRC must be an image dataset. Fix: --format auto, imagefolder, webdataset or parquet")
    cfg = _source_config(src, resolution, spec.in_channels, batch_size, s3cfg, data_options)
    info = inspect_dataset(cfg)
    if info.format == "latents":
        raise DataError(f"{storage.redact_uri(src)} already holds latents. Fix: encode the image dataset it came from")
    storage.check_writable(dest, cfg.s3)
    # The old manifest goes first: until the new one is written, DEST is no dataset.
    storage.delete(storage.join(dest, LATENTS_MANIFEST), cfg.s3)

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, configure_logging=True, logging_level=logging.WARNING,
                 logging_config=ray.LoggingConfig(log_level="ERROR"))
    counter_name = f"raydiff-encode-{uuid.uuid4().hex[:12]}"
    from ray.data import DataContext

    ctx = DataContext.get_current()
    bars = ctx.enable_progress_bars
    try:
        if progress:
            ctx.enable_progress_bars = False  # one bar: ours
        ds = build_train_dataset(cfg, info, counter_name=counter_name)
        ds = latent_stage(ds, spec, batch_size=batch_size, concurrency=concurrency, scaling_factor=scaling_factor,
                          dtype=dtype, counter_name=counter_name)
        writer = _ShardWriter(dest, cfg.s3, shard_rows)
        class_counts: Counter[str] = Counter()
        bar = tqdm(total=info.num_samples, unit="img", desc="encode", disable=None if progress else True, file=sys.stderr)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            labels = batch["label"].astype(np.int64)
            if info.class_names is None:
                labels = np.full(len(labels), NO_LABEL, np.int64)
            else:
                class_counts.update(info.class_names[i] for i in labels.tolist())
            writer.add(batch["latent"], labels)
            bar.update(len(labels))
        writer.close()
        bar.close()
        skipped = bad_sample_counts(counter_name)
    finally:
        ctx.enable_progress_bars = bars
        h = counter(counter_name, create=False) if ray.is_initialized() else None
        if h is not None:
            ray.kill(h)
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
        "classes": list(info.class_names) if info.class_names else None,
        "class_counts": dict(sorted(class_counts.items())),
        "source": storage.redact_uri(src),
        "source_format": info.format,
        "bad_samples": skipped,
        "shards": writer.shards,
        "created_by": "raydiff data encode",
    }
    storage.write_bytes(storage.join(dest, LATENTS_MANIFEST), json.dumps(manifest, indent=1).encode(), cfg.s3)
    print(
        f"{storage.redact_uri(dest)}: {num} latents of shape {manifest['shape']} ({dtype}) in {len(writer.shards)} "
        f"shard(s), {len(info.class_names or ())} classes"
        + (f"; bad samples: {', '.join(f'{k}={v}' for k, v in sorted(skipped.items()))}" if skipped else "")
        + f". Train with: data.source={storage.redact_uri(dest)} data.format=latents data.resolution={side}",
        file=out,
    )
    return manifest
