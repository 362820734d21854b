"""Persisting a checkpoint off the training step, with a manifest that makes it verifiable.

Every rank writes its part of a checkpoint into a staging directory and hands it to Ray Train
with ``checkpoint_upload_mode=ASYNC``: training goes on while a Ray thread runs
``PersistCheckpoint``. That thread first records the rank's files (relative path, size,
sha256) in ``manifest.rank<r>.json`` — hashing here costs the step nothing — and then moves
the files into ``{run}/checkpoint_<step>`` (a rename for local run directories, staged inside
the run directory so that it is the same filesystem) or copies them to object storage, the
manifest last, and only while the run's lease is this run's (storage/fence.py). A checkpoint
counts only when the manifest of every rank is there and matches (verify.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from orchestrator.storage import Fence, LeaseLost, filesystem_for, parse_uri
from orchestrator.storage.rundir import STAGING_DIR

if TYPE_CHECKING:
    from orchestrator.config import S3Config

MANIFEST_PREFIX = "manifest.rank"
# How long a checkpoint upload refused by the fence waits for its process to be ended (above).
LOST_WAIT_S = 600.0
HASH_CHUNK = 8 << 20


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank}.json"


def sha256_stream(read) -> str:
    """sha256 of a stream read with ``read(n)`` in chunks (local files and pyarrow streams)."""
    h = hashlib.sha256()
    while chunk := read(HASH_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | Path, *, rank: int, world: int, step: int) -> dict[str, Any]:
    d = Path(directory)
    files = {}
    for f in sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith(MANIFEST_PREFIX)):
        with open(f, "rb") as fh:
            files[f.relative_to(d).as_posix()] = {"size": f.stat().st_size, "sha256": sha256_stream(fh.read)}
    # Which process wrote this rank's part (PersistCheckpoint runs in the worker process): for
    # operators matching a checkpoint to a worker's logs, and for the worker-kill test.
    manifest = {"rank": rank, "world_size": world, "step": step, "pid": os.getpid(), "host": socket.gethostname(),
                "files": files}
    (d / manifest_name(rank)).write_text(json.dumps(manifest, indent=1))
    return manifest


def staging_dir(run_uri: str, step: int, rank: int, holder: str | None = None) -> str:
    """Where a rank writes its part of a checkpoint before it is persisted: inside a local run
    directory (same filesystem: persisting is a rename, not a second copy of gigabytes of
    optimizer state), or a local temporary directory for object storage. Named by the lease
    holder too: a driver whose lease was taken over never writes into its successor's staging
    directory of the same step."""
    loc = parse_uri(run_uri)
    if loc.is_s3:
        return tempfile.mkdtemp(prefix=f"raydiff-ckpt-{step}-r{rank}-")
    owner = f"{holder[:12]}-" if holder else ""
    d = Path(loc.key) / STAGING_DIR / f"{owner}step_{step:08d}_rank{rank}"
    shutil.rmtree(d, ignore_errors=True)  # left over by a run killed while staging
    d.mkdir(parents=True)
    return str(d)


def clear_staging(run_uri: str) -> None:
    """Remove what killed runs left in a local run directory's staging area (the driver, holding
    the lease, before its workers start: a previous holder still staging can commit nothing)."""
    loc = parse_uri(run_uri)
    if not loc.is_s3:
        shutil.rmtree(Path(loc.key) / STAGING_DIR, ignore_errors=True)


class PersistCheckpoint:
    """``checkpoint_upload_fn`` for ``ray.train.report``: manifest, then move or upload the files,
    the manifest last. The manifest commits the rank's part (verify.py trusts no checkpoint
    without every rank's), and it is written only while the run's lease is this run's: through
    ``fence`` (storage/fence.py), so that a driver whose lease was taken over commits nothing.
    ``delay_s``: the write-delay test hook (train/faults.py), a slow upload before the commit."""

    def __init__(self, run_uri: str, s3cfg: "S3Config | None", *, rank: int, world: int, step: int,
                 fence: "Fence | None" = None, delay_s: float = 0.0, lost_wait_s: float = LOST_WAIT_S):
        self.run_uri, self.s3cfg = run_uri, s3cfg
        self.rank, self.world, self.step = rank, world, step
        self.fence = fence or Fence(run_uri, s3cfg)
        self.delay_s, self.lost_wait_s = delay_s, lost_wait_s

    def __call__(self, checkpoint: Any, dir_name: str) -> Any:
        try:
            return self._persist(checkpoint, dir_name)
        except LeaseLost:
            # Raising here would make Ray log this thread's traceback and retry the worker group.
            # The fence remembers the loss, so the training loop stops at its next write (quietly,
            # worker.py) and the driver exits at its next renewal, ending this process; the wait
            # is bounded for a driver that never learns of it (its storage unreachable).
            threading.Event().wait(self.lost_wait_s)
            raise

    def _persist(self, checkpoint: Any, dir_name: str) -> Any:
        # Here, not at the top: verify.py (and so `raydiff sample`) reads manifests without Ray.
        from ray.train import Checkpoint

        src = Path(checkpoint.path)
        write_manifest(src, rank=self.rank, world=self.world, step=self.step)
        manifest = manifest_name(self.rank)
        if self.delay_s:
            time.sleep(self.delay_s)
        loc = parse_uri(self.run_uri)
        if not loc.is_s3:
            dest = Path(loc.key) / dir_name
            # Renames, under the fence's shared lock: a takeover waits for them or refuses them all.
            with self.fence.writing():
                files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != manifest)
                for f in [*files, src / manifest]:
                    target = dest / f.relative_to(src)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, target)
            shutil.rmtree(src, ignore_errors=True)
            return Checkpoint.from_directory(str(dest))
        fs, root = filesystem_for(self.run_uri, self.s3cfg)
        dest = f"{root}/{dir_name}"
        local = pafs.LocalFileSystem()
        held = Path(tempfile.mkdtemp(prefix="raydiff-manifest-"))
        try:
            os.replace(src / manifest, held / manifest)  # the data files first, the manifest after them
            with self.fence.writing():
                pafs.copy_files(str(src), dest, source_filesystem=local, destination_filesystem=fs)
            with self.fence.writing():
                pafs.copy_files(str(held), dest, source_filesystem=local, destination_filesystem=fs)
            try:
                self.fence.check()  # the takeover may have come during that last upload
            except LeaseLost:
                fs.delete_file(f"{dest}/{manifest}")  # uncommitted again: never trusted
                raise
        finally:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(held, ignore_errors=True)
        return Checkpoint(dest, filesystem=fs)
