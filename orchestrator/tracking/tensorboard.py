"""TensorBoard event files in ``{run}/tensorboard`` (tensorboardX, installed with Ray).

Local run directories: one SummaryWriter writes there directly (flushed every 30 s and at
checkpoints). Object storage has no append, and re-uploading one growing file would be quadratic
in the run length, so on S3 the writer writes to a local staging directory and every
``upload_every_s`` seconds and at every checkpoint the current event file is closed, uploaded as
a new object and a new file is started: each byte is uploaded once. TensorBoard reads the files
of a directory in name order, and the names (``events.out.tfevents.<unix time>.<host>.<pid>.<time ns>``)
sort in write order.

A run whose writes are fenced by its lease (storage/fence.py) stages its event files in a local
temporary directory on local run directories too, and writes each closed file into place, as it
would upload it, only while the lease is its own: tensorboardX writes from a thread of its own,
so a write straight into the run directory could not be refused after a takeover.

Resume and rollback: the writer of a resumed run starts its first file with TensorBoard's purge
marker (``purge_step``: a SessionLog START at the resume step + 1), so TensorBoard drops the
older events from that step on and no step is shown twice.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter

from orchestrator.storage import join, parse_uri, write_bytes

if TYPE_CHECKING:
    from orchestrator.config import S3Config
    from orchestrator.storage import Fence


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, target_uri: str, s3: "S3Config | None" = None, *, resume_step: int = 0,
                 upload_every_s: float = 120.0, fence: "Fence | None" = None):
        self.target = target_uri.rstrip("/")
        self.s3 = s3
        self.is_s3 = parse_uri(self.target).is_s3
        self.fence = fence if fence is not None and fence.holder_id is not None else None
        # Staged: written to a local directory, each closed file moved or uploaded into place.
        self.staged = self.is_s3 or self.fence is not None
        self.upload_every_s = upload_every_s
        if self.staged:
            self.logdir = tempfile.mkdtemp(prefix="raydiff-tensorboard-")
            if not self.is_s3:
                Path(parse_uri(self.target).key).mkdir(parents=True, exist_ok=True)
        else:
            self.logdir = parse_uri(self.target).key
            Path(self.logdir).mkdir(parents=True, exist_ok=True)
        self._writer = None
        self._last_upload = time.monotonic()
        self._open(purge_step=resume_step + 1)

    def _open(self, purge_step: int | None) -> None:
        # tensorboardX names files by the second; the pid and nanosecond clock keep files opened in
        # the same second apart (two writers of a run, a rollback, segments) and in write order.
        self._writer = SummaryWriter(self.logdir, purge_step=purge_step, flush_secs=30,
                                     filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self._writer.add_scalar(tag, v, step)
        if self.staged and time.monotonic() - self._last_upload >= self.upload_every_s:
            self._rotate(purge_step=None)

    def image(self, step: int, png: bytes) -> None:
        img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        self._writer.add_image("samples", img, step, dataformats="HWC")

    def rewind(self, step: int) -> None:
        """Training continues after ``step`` (a rollback): later events are redone."""
        self._rotate(purge_step=step + 1)

    def flush(self) -> None:
        if self.staged:
            self._rotate(purge_step=None)
        else:
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()
        if self.staged:
            # Not removed when the upload is refused (storage/fence.py): the next holder's driver
            # clears the run's staging area.
            self._upload()
            shutil.rmtree(self.logdir, ignore_errors=True)

    def _rotate(self, purge_step: int | None) -> None:
        self._writer.close()
        self._upload()
        self._open(purge_step)

    def _upload(self) -> None:
        """Move or upload the closed files of the staging directory into place (not staged: no-op)."""
        self._last_upload = time.monotonic()
        if not self.staged:
            return
        for name in sorted(os.listdir(self.logdir)):
            path = os.path.join(self.logdir, name)
            with open(path, "rb") as f, self.fence.writing() if self.fence is not None else contextlib.nullcontext():
                write_bytes(join(self.target, name), f.read(), self.s3)  # local: written whole, then renamed
            os.remove(path)
