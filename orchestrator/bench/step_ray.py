"""The ``raydiff-ray`` variant of ``raydiff bench step``: the same ``TrainStep`` inside a
one-worker Ray Train run whose batches come from Ray Data (``iter_torch_batches``), as in
``raydiff train``; the worker times its own steps and returns the rate through a file.

Ray pickles ``_random_rows`` and ``bench_worker`` by reference: every process that runs them
imports this module first, so it imports only numpy and Ray at the top. The data tasks need
nothing else, and the worker imports the network's libraries as a training worker does
(train/launch.py), without the ones its run never uses (they cost each of the three processes
about 8 CPU-s on 2 cores when this module imported them)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

if TYPE_CHECKING:
    from orchestrator.bench.timing import Result
    from orchestrator.config import TrainConfig
    from orchestrator.plan import Plan


def _random_rows(batch: dict[str, np.ndarray], channels: int, resolution: int, num_classes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(batch["id"][0]))
    n = len(batch["id"])
    return {"image": rng.uniform(-1, 1, (n, channels, resolution, resolution)).astype(np.float32),
            "label": rng.integers(0, num_classes, n).astype(np.int64)}


def bench_worker(config: dict[str, Any]) -> None:
    from orchestrator.train.launch import keep_unused_libraries_out

    keep_unused_libraries_out(config["cfg"])
    import ray.train
    import torch

    from orchestrator.bench.timing import sync
    from orchestrator.config import validate_config
    from orchestrator.plan import Plan
    from orchestrator.train.step import TrainStep

    cfg, plan = validate_config(config["cfg"]), Plan(**config["plan"])
    if config["channels"] != cfg.data.channels:  # latents: 4 channels, outside the RGB config's choices
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"channels": config["channels"]})})
    device = torch.device("cuda", torch.cuda.current_device()) if plan.device == "gpu" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    t_build = time.perf_counter()
    ts = TrainStep(cfg, plan, config["num_classes"], device=device)
    warmup, steps = config["warmup"], config["steps"]
    it = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=plan.micro_batch_size, drop_last=True, prefetch_batches=cfg.data.prefetch_batches,
        dtypes={"image": torch.float32, "label": torch.int64}, device=device)
    first = t0 = None
    for i, batch in enumerate(it):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        ts.step(batch, i)
        if i == 0:
            sync(device)
            first = time.perf_counter() - t_build
        if i + 1 == warmup + steps:
            break
    sync(device)
    rate = plan.micro_batch_size * steps / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    with open(config["out"], "w") as f:
        json.dump({"images_per_s": rate, "first_step_s": first, "peak_mem_gib": peak}, f)
    ray.train.report({"done": 1})


def raydiff_in_ray_train(cfg: TrainConfig, plan: Plan, *, num_classes: int, warmup: int, steps: int) -> Result:
    from ray.data import DataContext
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.bench.timing import Result
    from orchestrator.config import config_to_dict

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        n = plan.micro_batch_size * (warmup + steps)
        c, r = cfg.data.channels, cfg.data.resolution
        ds = ray.data.range(n, override_num_blocks=max(1, min(16, n // plan.micro_batch_size))).map_batches(
            _random_rows, fn_kwargs={"channels": c, "resolution": r, "num_classes": num_classes}).materialize()
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            resources = {"CPU": 1, **({"GPU": 1} if plan.device == "gpu" else {})}
            trainer = TorchTrainer(
                bench_worker,
                train_loop_config={"cfg": config_to_dict(cfg, reveal_secrets=True), "plan": plan.as_dict(),
                                   "channels": c, "num_classes": num_classes, "warmup": warmup, "steps": steps,
                                   "out": out},
                scaling_config=ScalingConfig(num_workers=1, use_gpu=plan.device == "gpu", resources_per_worker=resources),
                run_config=RunConfig(name=f"bench-step-{os.getpid()}-{time.time_ns()}", storage_path=tmp,
                                     worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if plan.device == "gpu" else "cpu"}}),
                datasets={"train": ds},
            )
            t0 = time.perf_counter()
            trainer.fit()
            wall = time.perf_counter() - t0
            with open(out) as f:
                got = json.load(f)
        return Result("raydiff-ray", got["images_per_s"], got["first_step_s"], got["peak_mem_gib"], steps,
                      plan.micro_batch_size, f"Ray Data -> Ray Train, 1 worker; run wall {wall:.0f} s")
    finally:
        if started:
            ray.shutdown()
