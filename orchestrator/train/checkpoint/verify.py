"""Which checkpoint can be trusted, chosen by raydiff rather than by Ray's run snapshot.

A checkpoint is good when ``train_state.json`` is there and readable, every rank's manifest is
there and every file listed in it has its size and sha256, and the EMA and model weights are
finite. Training, ``raydiff sample``, ``export`` and ``eval`` all ask this (through manager.py).
On resume the newest good checkpoint is used; newer ones that fail are set aside under
``{run}/corrupt/`` with a warning naming the file, so that a damaged or half-written
checkpoint never makes a run unrecoverable and is never trained from. Ray Train's own
``checkpoint_manager_snapshot.json`` is removed before a run starts: it would otherwise point
at a checkpoint that was deleted or set aside and stop the run (Ray's
CheckpointManagerInitializationError).
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Callable

import pyarrow.fs as pafs

from orchestrator.storage import RunDir, delete, filesystem_for, join, list_files
from orchestrator.train.checkpoint.layout import (
    DS_TAG,
    EMA_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointRef,
    checkpoint_step,
    list_checkpoints,
    read_step,
)
from orchestrator.train.checkpoint.persist import MANIFEST_PREFIX, manifest_name, sha256_stream

log = logging.getLogger("raydiff")
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
CORRUPT_DIR = "corrupt"
# Full-weight DeepSpeed model file (ZeRO 0-2; under ZeRO-3 the weights are in the shards).
DS_MODEL_FILE = f"{DS_TAG}/mp_rank_00_model_states.pt"


class CheckpointProblem(ValueError):
    """A checkpoint that must not be trained from; the message names the file."""


@dataclass(frozen=True)
class Verdict:
    ref: CheckpointRef | None
    skipped: tuple[tuple[str, str], ...]  # (checkpoint name, problem)


def _non_finite(tensors: dict, what: str) -> str | None:
    import torch

    for name, t in tensors.items():
        if isinstance(t, dict):
            bad = _non_finite(t, what)
            if bad:
                return bad
        elif isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            return f"{what}: {int((~torch.isfinite(t)).sum())} NaN/inf values in {name}"
    return None


def verify_checkpoint(rundir: RunDir, name: str) -> None:
    """Raise ``CheckpointProblem`` naming the first problem found in checkpoint ``name``."""
    where = join(rundir.uri, name)
    files = dict(list_files(where, rundir.s3))
    if STATE_FILE not in files:
        raise CheckpointProblem(f"{where}: incomplete, {STATE_FILE} is missing")
    try:
        read_step(rundir, name)
    except ValueError as e:
        raise CheckpointProblem(str(e)) from None
    try:
        model = json.loads(rundir.read_text(posixpath.join(name, MODEL_FILE)))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointProblem(f"{join(where, MODEL_FILE)}: unreadable ({e})") from None
    world = model.get("world_size")
    manifests = sorted(f for f in files if f.startswith(MANIFEST_PREFIX))
    if world is None and not manifests:
        log.warning("checkpoint %s has no manifests (written by an older raydiff): checking readability only", where)
    for rank in range(world or len(manifests)):
        mname = manifest_name(rank)
        if mname not in files:
            raise CheckpointProblem(f"{join(where, mname)} is missing: rank {rank} never finished persisting")
        try:
            manifest = json.loads(rundir.read_text(posixpath.join(name, mname)))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointProblem(f"{join(where, mname)}: unreadable ({e})") from None
        fs, root = filesystem_for(where, rundir.s3)
        for rel, meta in manifest["files"].items():
            path = join(where, rel)
            if files.get(rel) != meta["size"]:
                raise CheckpointProblem(f"{path}: size {files.get(rel)} bytes, the manifest says {meta['size']}")
            with fs.open_input_stream(f"{root}/{rel}") as f:
                if sha256_stream(f.read) != meta["sha256"]:
                    raise CheckpointProblem(f"{path}: contents changed since it was written (sha256 mismatch)")
    import torch  # here: a driver with no checkpoint to verify starts without it (issue 18)

    for rel, key, loader in ((EMA_FILE, "ema", True), (DS_MODEL_FILE, "module", False)):
        if rel not in files:
            continue
        try:
            # ema.pt holds tensors and numbers only; DeepSpeed's file also holds its own objects,
            # read only after the manifest vouched for it.
            state = torch.load(io.BytesIO(rundir.read_bytes(posixpath.join(name, rel))), map_location="cpu",
                               weights_only=loader)
        except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint bad
            raise CheckpointProblem(f"{join(where, rel)}: unreadable ({type(e).__name__}: {e})") from None
        bad = _non_finite(state.get(key, state) if isinstance(state, dict) else {}, join(where, rel))
        if bad:
            raise CheckpointProblem(bad)


def choose_resume_checkpoint(rundir: RunDir, refs: list[CheckpointRef],
                             warn: Callable[[str], None] = log.warning) -> Verdict:
    """The newest checkpoint that verifies; the newer ones that do not, with their problems."""
    skipped = []
    for ref in sorted(refs, key=lambda r: r.step, reverse=True):
        try:
            verify_checkpoint(rundir, ref.name)
        except CheckpointProblem as e:
            warn(f"raydiff: skipping checkpoint {ref.name} (step {ref.step}): {e}")
            skipped.append((ref.name, str(e)))
            continue
        return Verdict(ref, tuple(skipped))
    return Verdict(None, tuple(skipped))


def set_aside(rundir: RunDir, name: str) -> str:
    """Move a bad checkpoint to ``{run}/corrupt/<name>`` (kept for inspection, never resumed)."""
    fs, root = filesystem_for(rundir.uri, rundir.s3)
    dest = f"{root}/{CORRUPT_DIR}/{name}"
    fs.create_dir(f"{root}/{CORRUPT_DIR}", recursive=True)
    try:
        fs.delete_dir(dest)
    except (FileNotFoundError, OSError):
        pass
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(f"{root}/{name}", dest)  # a rename
    else:  # object stores have no directory rename
        pafs.copy_files(f"{root}/{name}", dest, source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(f"{root}/{name}")
    return join(rundir.uri, CORRUPT_DIR, name)


def forget_ray_snapshot(rundir: RunDir) -> None:
    delete(join(rundir.uri, RAY_SNAPSHOT), rundir.s3)


def prune(rundir: RunDir, refs: list[CheckpointRef], keep: int, protect: str | None = None) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints (never ``protect``); returns the deleted names."""
    fs, root = filesystem_for(rundir.uri, rundir.s3)
    doomed = [r.name for r in sorted(refs, key=lambda r: r.step)[:-keep] if r.name != protect]
    for name in doomed:
        fs.delete_dir(f"{root}/{name}")
    return doomed


def newer_good_checkpoint(rundir: RunDir, known: str | None) -> str | None:
    """When a worker group restarts inside a run: the URI of the newest checkpoint in the run
    directory that is newer than ``known`` (the one Ray Train hands back, or the driver's
    choice) and verifies; None when there is none. Ray counts a checkpoint only once its
    controller has registered every rank's report, which lags persisting: a worker killed in
    between leaves a complete checkpoint that ``ray.train.get_checkpoint()`` does not return
    (seen: a kill just after the first checkpoint restarted the run from step 0)."""
    after = checkpoint_step(known) if known else None
    refs = [r for r in list_checkpoints(rundir) if after is None or r.step > after]
    verdict = choose_resume_checkpoint(rundir, refs)
    return join(rundir.uri, verdict.ref.name) if verdict.ref is not None else None
