"""Fencing: once a run's lease is taken over, its old holder writes nothing more to the run.

The lease (lease.py) decides who may write a run; a holder learns that it lost the lease only at
its next renewal, and its Ray Train workers, checkpoint uploads and grids may still be busy
then. So every write to the run directory by a lease holder (checkpoint commits, metrics and
events, grids, the driver's files) goes through its ``Fence``, which names the holder (the id in
``lease.json``):

- local run directories: the write runs under a shared ``flock`` on ``.lease.lock`` after the
  lease has been read and found to be ours. A takeover takes that lock exclusively, so it waits
  for a write in progress, and every write after it sees the new holder: none gets through.
- object storage has no lock and no condition across two objects, so the lease is read right
  before the write (and, for a checkpoint, again after its manifest, which is deleted if the
  lease changed meanwhile: the checkpoint is then uncommitted and never trusted, verify.py).
  What remains is one request's round trip between the read and the write; the lease's
  ``ttl_s`` is far longer, so only a forced takeover (``--force``) can fall into it.

A lost lease is remembered: later writes are refused without reading the lease again. A refused
write raises ``LeaseLost``; the holder's driver exits with ``LEASE_LOST_EXIT``.
"""

from __future__ import annotations

import contextlib
import fcntl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from orchestrator.storage.lease import LeaseLost, describe_holder, read_lease
from orchestrator.storage.lease_store import LEASE_FILE
from orchestrator.storage.rundir import RunDir
from orchestrator.storage.uri import join, parse_uri

if TYPE_CHECKING:
    from orchestrator.config import S3Config, TrainConfig


@dataclass
class Fence:
    """Writes by lease holder ``holder_id`` to the run at ``run_uri``. ``holder_id=None``: no lease
    (commands that do not train: sample, eval, report), nothing is checked."""

    run_uri: str
    s3cfg: "S3Config | None" = None
    holder_id: str | None = None
    _lost: LeaseLost | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        # Crosses to the workers (and Ray's upload threads): each process finds out on its own.
        return {**self.__dict__, "_lost": None}

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def check(self) -> None:
        """``LeaseLost`` unless the lease still names this holder."""
        if self.holder_id is None:
            return
        if self._lost is not None:
            raise self._lost
        rec = read_lease(self.run_uri, self.s3cfg)
        if rec is None or (rec.get("holder") or {}).get("id") != self.holder_id:
            who = f"by {describe_holder(rec)}" if rec else "(the lease was deleted)"
            self._lost = LeaseLost(f"the lease of run {self.run_uri} was taken over {who}")
            raise self._lost

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around one write (or one commit of several files): refused with ``LeaseLost`` when the
        lease is not ours; on local disk a takeover waits until the block ends."""
        if self.holder_id is None:
            yield
            return
        loc = parse_uri(join(self.run_uri, LEASE_FILE))
        if loc.is_s3:
            self.check()
            yield
            return
        lock = Path(loc.key).with_name(".lease.lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            try:
                self.check()
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def fenced_rundir(cfg: "TrainConfig", holder: str | None) -> RunDir:
    """The run directory of ``cfg`` whose writes are fenced by lease holder ``holder`` (None:
    not fenced)."""
    run = RunDir.for_config(cfg)
    return RunDir(run.uri, run.s3, Fence(run.uri, run.s3, holder)) if holder is not None else run
