"""``raydiff bench data URI``: the real training input pipeline against a plain PIL loop.

Both read the same samples from the same store (local or S3) in the same run. The pipeline's
rate is divided by the CPU cores it may use, the plain loop runs in one process on one core;
the printed ratio is pipeline images/s per core over plain-loop images/s.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from typing import Any

import numpy as np
from PIL import Image

from orchestrator.config import DataConfig, S3Config
from orchestrator.data.pipeline import build_train_dataset, head, inspect_dataset, iter_samples
from orchestrator.storage.flags import s3_config_from_args


def plain_loop(cfg, info, limit: int | None) -> tuple[int, float]:
    """What a user writes without a framework: read, PIL decode, convert, resize, scale."""
    n, t0 = 0, time.perf_counter()
    mode = "RGB" if cfg.channels == 3 else "L"
    size = (cfg.resolution, cfg.resolution)
    for _name, data, _label in iter_samples(cfg, info, threads=1):
        if isinstance(data, str):
            continue
        try:
            img = Image.open(io.BytesIO(data)).convert(mode).resize(size)
        except Exception:  # noqa: BLE001 - bad samples are skipped by both sides
            continue
        arr = np.asarray(img, dtype=np.float32) * (2.0 / 255.0) - 1.0
        n += arr.shape[0] > 0
        if limit and n >= limit:
            break
    return n, time.perf_counter() - t0


def pipeline_pass(ds, batch_size: int) -> tuple[int, float]:
    n, t0 = 0, time.perf_counter()
    for batch in ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=4, drop_last=False):
        n += int(batch["image"].shape[0])
    return n, time.perf_counter() - t0


def run_bench(uri: str, *, limit: int | None = 2000, resolution: int = 64, batch_size: int = 128, cores: int | None = None,
              repeats: int = 3, s3cfg=None, out=None) -> dict[str, Any]:
    import ray

    out = out or sys.stdout
    cores = cores or os.cpu_count() or 1
    cfg = DataConfig(source=uri, resolution=resolution).with_storage(s3cfg or S3Config())
    info = inspect_dataset(cfg)
    if limit:
        info = head(info, limit)  # one file per sample (image folders): read only what is timed
    if not ray.is_initialized():
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    ds = build_train_dataset(cfg, info)
    cold_n, cold_s = pipeline_pass(ds, batch_size)
    # Best of several passes on each side, interleaved: on a shared machine other users' load
    # comes and goes, and the best pass is the one least disturbed by it.
    pipe_rate = plain_rate = 0.0
    warm_n = plain_n = 0
    for _ in range(repeats):
        warm_n, warm_s = pipeline_pass(ds, batch_size)
        pipe_rate = max(pipe_rate, warm_n / warm_s)
        plain_n, plain_s = plain_loop(cfg, info, limit)
        plain_rate = max(plain_rate, plain_n / plain_s)
    result = {
        "source": uri,
        "format": info.format,
        "images": warm_n,
        "repeats": repeats,
        "resolution": resolution,
        "cores": cores,
        "pipeline_cold_img_s": cold_n / cold_s,
        "pipeline_img_s": pipe_rate,
        "pipeline_img_s_per_core": pipe_rate / cores,
        "plain_img_s": plain_rate,
        "ratio_per_core": pipe_rate / cores / plain_rate,
    }
    print(
        f"data bench: {info.format} {warm_n} images -> {resolution}x{resolution}, {cores} cores, best of {repeats}\n"
        f"  raydiff pipeline: {result['pipeline_cold_img_s']:,.0f} img/s cold, {pipe_rate:,.0f} img/s steady "
        f"({pipe_rate / cores:,.0f} img/s per core)\n"
        f"  plain PIL loop (1 process): {plain_rate:,.0f} img/s ({plain_n} images)\n"
        f"  ratio per core: {result['ratio_per_core']:.2f}x",
        file=out,
    )
    return result


def cmd_bench_data(args: argparse.Namespace) -> int:
    run_bench(args.uri, limit=args.limit or None, resolution=args.resolution, batch_size=args.batch_size, cores=args.cores,
              repeats=args.repeats, s3cfg=s3_config_from_args(args))
    return 0
