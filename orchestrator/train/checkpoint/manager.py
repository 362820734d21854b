"""The owner of a run's checkpoints: which exist, which can be trusted, what a run resumes
from, what ``raydiff sample``, ``export`` and ``eval`` open, and what is pruned.

``Checkpointer`` needs only the run directory: the driver asks it what a run would resume from
and to prune after a fit; the inference commands open checkpoints through ``Checkpointer.open``,
which gives them the verification training gets (verify.py: manifests and hashes, finite
weights, a readable train_state.json). A damaged checkpoint named directly is refused with a
``ConfigError`` naming the file and the problem; for a run directory the newest good checkpoint
is used, with a warning naming each one skipped. Inside the Ray Train workers its subclass
``TrainCheckpointer`` (training.py) adds the engine: restore, save and rollback.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from orchestrator.config import ConfigError, TrainConfig
from orchestrator.storage import RunDir, join, parse_uri, redact_uri
from orchestrator.train.checkpoint.layout import STATE_FILE, CheckpointRef, list_checkpoints, read_step, \
    scan_checkpoints
from orchestrator.train.checkpoint.verify import (
    CheckpointProblem,
    Verdict,
    choose_resume_checkpoint,
    forget_ray_snapshot,
    newer_good_checkpoint,
    prune,
    set_aside,
    verify_checkpoint,
)

if TYPE_CHECKING:
    import torch

    from orchestrator.config import S3Config

log = logging.getLogger("raydiff")
Warn = Callable[[str], None]


def _parent(uri: str) -> tuple[str, str]:
    """(run directory URI, checkpoint name) of a checkpoint directory URI."""
    loc = parse_uri(uri)
    if loc.is_s3:
        head, _, name = uri.rpartition("/")
        if not name or head.endswith(":/"):
            raise ConfigError(f"{redact_uri(uri)} names a bucket, not a checkpoint directory")
        return head, name
    p = Path(loc.key)
    return str(p.parent), p.name


class Checkpointer:
    """A run directory's checkpoints, and every decision about them that needs no engine."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir

    @classmethod
    def for_config(cls, cfg: TrainConfig) -> "Checkpointer":
        return cls(RunDir.for_config(cfg))

    def uri(self, ref: CheckpointRef) -> str:
        return join(self.rundir.uri, ref.name)

    # -- what is there ----------------------------------------------------------------------------
    def checkpoints(self, warn: Warn = log.warning) -> list[CheckpointRef]:
        """Complete checkpoints, oldest first (not verified: listing reads train_state.json only)."""
        return list_checkpoints(self.rundir, warn)

    def latest(self, warn: Warn = log.warning) -> CheckpointRef | None:
        refs = self.checkpoints(warn)
        return refs[-1] if refs else None

    def newest_good(self, warn: Warn = log.warning) -> Verdict:
        """The newest checkpoint that verifies, and the bad ones skipped on the way: newer ones
        that fail verification and every one whose train_state.json cannot be read."""
        listing = scan_checkpoints(self.rundir)
        for name, problem in listing.unreadable:
            warn(f"raydiff: skipping checkpoint {name}: {problem}")
        verdict = choose_resume_checkpoint(self.rundir, listing.refs, warn)
        return Verdict(verdict.ref, verdict.skipped + listing.unreadable)

    def newer_good(self, known: str | None) -> str | None:
        """URI of the newest good checkpoint newer than checkpoint URI ``known`` (verify.py)."""
        return newer_good_checkpoint(self.rundir, known)

    def trusted(self, name: str) -> CheckpointRef:
        """Checkpoint ``name`` after verification; ``ConfigError`` naming the file and the problem."""
        try:
            verify_checkpoint(self.rundir, name)
        except CheckpointProblem as e:
            raise ConfigError(f"checkpoint {name} cannot be used: {e}. Fix: give its run directory to use the "
                              "newest good checkpoint, or another checkpoint_* directory") from None
        return CheckpointRef(name, read_step(self.rundir, name))

    # -- driver decisions -------------------------------------------------------------------------
    def prepare_resume(self) -> str | None:
        """Before a run starts: the URI of the checkpoint to resume from (None: start fresh). Bad
        newer checkpoints are set aside and recorded in events.jsonl; Ray's snapshot is dropped."""
        verdict = self.newest_good()
        for name, problem in verdict.skipped:
            with self._writing():
                moved = set_aside(self.rundir, name)
            self.rundir.event({"event": "checkpoint_skipped", "checkpoint": name, "problem": problem,
                               "moved_to": moved})
        with self._writing():
            forget_ray_snapshot(self.rundir)
        return self.uri(verdict.ref) if verdict.ref is not None else None

    def prune(self, keep: int, protect: str | None = None) -> list[str]:
        """Delete all but the newest ``keep`` checkpoints (never ``protect``); returns the names.
        Ray Train keeps ``checkpoint.keep`` of one invocation's checkpoints; older invocations'
        are pruned here."""
        with self._writing():
            return prune(self.rundir, self.checkpoints(), keep, protect)

    def _writing(self):
        """Changes to the run (moves, deletions) only while the lease is this run's (storage/fence.py)."""
        return self.rundir.fence.writing() if self.rundir.fence is not None else contextlib.nullcontext()

    # -- inference --------------------------------------------------------------------------------
    @classmethod
    def open(cls, uri: str, s3: "S3Config | None" = None, name: str | None = None,
             warn: Warn = log.warning) -> tuple["Checkpointer", CheckpointRef]:
        """The verified checkpoint that ``uri`` names: a checkpoint directory, or a run directory
        (its newest good checkpoint, or the one called ``name``). ``ConfigError`` when there is none."""
        uri = uri.rstrip("/")
        here = RunDir(uri, s3)
        if name is None and here.exists(STATE_FILE):
            parent, base = _parent(uri)
            ck = cls(RunDir(parent, s3))
            return ck, ck.trusted(base)
        ck = cls(here)
        if name is not None:
            if not any(r.name == name for r in ck.checkpoints(warn)):
                raise ConfigError(f"--checkpoint {redact_uri(uri)}: found no complete checkpoint named {name!r} "
                                  "there. Fix: give a run directory (e.g. runs/demo) or one of its checkpoint_* "
                                  "directories")
            return ck, ck.trusted(name)
        verdict = ck.newest_good(warn)
        if verdict.ref is not None:
            return ck, verdict.ref
        if verdict.skipped:
            raise ConfigError(f"--checkpoint {redact_uri(uri)}: no checkpoint there verifies ("
                              + "; ".join(p for _, p in verdict.skipped) + ")")
        raise ConfigError(f"--checkpoint {redact_uri(uri)}: found no complete checkpoint (checkpoint_*/ with "
                          "train_state.json) there. Fix: give a run directory (e.g. runs/demo) or one of its "
                          "checkpoint_* directories")

    def ema_model(self, ref: CheckpointRef, *, verify: bool = True) -> tuple[torch.nn.Module, TrainConfig]:
        """The denoiser with the EMA weights of ``ref`` (eval mode, CPU) and its training config.
        ``verify=False`` only for a ref this object has just verified (``open``, ``newest_good``)."""
        if verify:
            ref = self.trusted(ref.name)
        from orchestrator.train.checkpoint.files import read_ema_model  # torch: not for the driver's start

        return read_ema_model(self.rundir, ref)

    def raw_model(self, ref: CheckpointRef, *, verify: bool = True) -> tuple[torch.nn.Module, TrainConfig]:
        """``ema_model`` with the raw DeepSpeed weights (fp32 master weights where ZeRO kept them)."""
        if verify:
            ref = self.trusted(ref.name)
        from orchestrator.train.checkpoint.files import read_raw_model

        return read_raw_model(self.rundir, ref)
