"""Resuming at another world size: DeepSpeed's universal checkpoint, converted on the fly.

ZeRO-1/2/3 save the fp32 master weights and Adam moments as one flat shard per data-parallel
rank (``ds/*_optim_states.pt``); DeepSpeed
refuses to load them at another world size ("Automatic adjustment of ZeRO's optimizer state
partitioning with a new world size is not currently supported"). When the checkpoint's world
size (model.json) differs from the run's, the checkpoint is converted with DeepSpeed's own
``deepspeed.checkpoint.ds_to_universal`` (per parameter: fp32 weights, exp_avg, exp_avg_sq,
step) and loaded with ``load_universal``, which re-partitions the state over the new ranks.
Without ZeRO (stage 0, bf16 or fp32) DeepSpeed 0.19 saves no shards: the whole optimizer is in
``mp_rank_00_model_states.pt`` and loads at any world size as it is.

Measured here (DeepSpeed 0.19.8, CPU, gloo). tests/test_elastic_resume.py covers ZeRO-2 with
bf16 and fp32 (converted) and ZeRO-0 with fp32 (loaded as it is), 2 -> 1 and 1 -> 2 workers:
fp32 weights, exp_avg, exp_avg_sq and step bit-identical after the move. ZeRO-1 is not in the
test (tests/elastic_ranks.py can run it as ``fp32-zero1``); ZeRO-3 (the converter's stage-3
branch) was checked once, bf16 2 -> 1 (``python tests/elastic_ranks.py ... bf16-zero3``), and
is not in the test either.

The converted copy goes to a node-local temporary directory, written by each node's local rank 0
(the conversion is deterministic; a node's ranks see the same path, other nodes make their own)
and removed after every rank has loaded it. The checkpoint itself is never modified: its
manifest (persist.py) stays valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, Iterator

from orchestrator.train.checkpoint.layout import saved_world_size

log = logging.getLogger("raydiff")


def universal_client_state() -> dict[str, Any]:
    """What the universal conversion needs in a checkpoint's client state: the format version
    (Megatron-style clients add tensor-parallel patterns here; raydiff's models have none)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, \
        UNIVERSAL_CHECKPOINT_VERSION_VALUE

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def optimizer_shards(ds_dir: str | Path) -> list[Path]:
    """The per-rank optimizer shard files of a DeepSpeed checkpoint tag directory (empty when the
    whole optimizer state is in the model-states file)."""
    return sorted(Path(ds_dir).glob("*_optim_states.pt"))


def needs_conversion(checkpoint_dir: str | Path, ds_tag: str, world: int) -> bool:
    """Whether loading needs re-sharding: the checkpoint holds per-rank optimizer shards from a
    different number of ranks than ``world``."""
    shards = optimizer_shards(Path(checkpoint_dir) / ds_tag)
    saved = saved_world_size(checkpoint_dir)
    if saved is None:
        saved = len(shards)  # older checkpoints: one shard per rank
    return bool(shards) and saved != world


def convert_to_universal(ds_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert one DeepSpeed checkpoint tag directory into a universal checkpoint at ``out_dir``
    (which must not exist). Runs in this process: no worker pool (a Ray worker's CPUs are its
    share only, and small models convert in seconds)."""
    from deepspeed.checkpoint import ds_to_universal

    out = Path(out_dir)
    args = Namespace(input_folder=str(ds_dir), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True,
                     # Checkpoints written before raydiff recorded the universal info.
                     inject_missing_state=True)
    # ds_to_universal prints its progress (print and tqdm); keep it out of the run's console.
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        ds_to_universal.main(args)
    return out


def _node_local_dir(checkpoint_dir: str | Path, world: int) -> Path:
    """The same path for every rank on a node, distinct per checkpoint and target world size."""
    key = hashlib.sha256(f"{Path(checkpoint_dir).resolve()}|{world}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"raydiff-universal-{key}"


@contextlib.contextmanager
def universal_copy(checkpoint_dir: str | Path, ds_tag: str, *, local_rank: int, world: int,
                   barrier) -> Iterator[Path]:
    """A universal conversion of ``checkpoint_dir/ds_tag``, made once per node; yields the
    directory to pass to ``engine.load_checkpoint(root, tag=ds_tag)``. ``barrier()`` waits for
    every rank (torch.distributed)."""
    root = _node_local_dir(checkpoint_dir, world)
    t0 = time.perf_counter()
    error: BaseException | None = None
    if local_rank == 0:
        shutil.rmtree(root, ignore_errors=True)  # left over by a killed run
        root.mkdir(parents=True)
        try:
            convert_to_universal(Path(checkpoint_dir) / ds_tag, root / ds_tag)
        except BaseException as e:  # noqa: BLE001 - re-raised after the barrier, so no rank hangs
            error = e
    barrier()
    try:
        if error is not None:
            raise RuntimeError(f"converting {checkpoint_dir} for {world} workers failed: {error}") from error
        if not (root / ds_tag / "zero").is_dir():
            raise RuntimeError(f"converting {checkpoint_dir} for {world} workers failed on another rank "
                               "of this node (no universal checkpoint was written)")
        log.info("universal checkpoint of %s made in %.1f s", checkpoint_dir, time.perf_counter() - t0)
        yield root
    finally:
        barrier()
        if local_rank == 0:
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def loading_universal(engine: Any) -> Iterator[None]:
    """``"checkpoint": {"load_universal": true}`` for one load. DeepSpeed reads this setting only
    in ``load_checkpoint`` (checked in 0.19.8: engine.py, never at initialize), so setting it for
    the one load that needs it is the config key, scoped; later loads of same-size checkpoints
    stay plain."""
    cfg = engine._config
    before = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = True
    try:
        yield
    finally:
        cfg.load_universal_checkpoint = before
