"""The run directory ``{run.storage}/{run.name}`` on local disk or object storage.

Ray Train writes checkpoints there itself; raydiff adds ``config.yaml``, ``plan.json``,
``metrics.jsonl``, ``events.jsonl``, ``samples/*.png`` and ``eval.json``. A thin view over the
storage package, so a laptop directory and an ``s3://`` prefix get the same atomic writes,
retries and credential-free error messages. A view given the ``Fence`` of the run's lease
holder (fence.py) writes only while the lease is its holder's: ``LeaseLost`` otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestrator.storage.files import exists, listdir, read_bytes, write_bytes
from orchestrator.storage.jsonl import JsonlLog, compact, read_records, supersede
from orchestrator.storage.uri import join

if TYPE_CHECKING:
    from orchestrator.config import S3Config, TrainConfig
    from orchestrator.storage.fence import Fence

METRICS_LOG = "metrics.jsonl"
EVENTS_LOG = "events.jsonl"
# Scratch space of the lease holder's writers (checkpoint parts, TensorBoard segments) before
# they are moved into place: inside the run directory, so that moving is a rename.
STAGING_DIR = ".staging"


class RunDir:
    def __init__(self, uri: str, s3: "S3Config | None" = None, fence: "Fence | None" = None):
        self.uri = uri.rstrip("/")
        self.s3 = s3
        self.fence = fence

    @classmethod
    def for_config(cls, cfg: "TrainConfig", fence: "Fence | None" = None) -> "RunDir":
        """The run directory of ``cfg``; with ``fence`` (fence.fenced_rundir) its writes are fenced."""
        return cls(join(cfg.run.storage, cfg.run.name), cfg.storage.s3, fence)

    def _u(self, rel: str) -> str:
        return join(self.uri, rel) if rel else self.uri

    def write_bytes(self, rel: str, data: bytes) -> str:
        if self.fence is None:
            write_bytes(self._u(rel), data, self.s3)
        else:
            with self.fence.writing():
                write_bytes(self._u(rel), data, self.s3)
        return self._u(rel)

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        return read_bytes(self._u(rel), self.s3)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def exists(self, rel: str) -> bool:
        return exists(self._u(rel), self.s3)

    def listdir(self, rel: str = "") -> list[str]:
        return listdir(self._u(rel), self.s3)

    # -- logs --------------------------------------------------------------------------------
    def log(self, name: str, *, flush_every_s: float = 30.0) -> JsonlLog:
        return JsonlLog(self.uri, name, self.s3, flush_every_s=flush_every_s, fence=self.fence)

    def event(self, record: dict[str, Any]) -> None:
        """Append one record to events.jsonl at once (events are rare; each is durable)."""
        log = self.log(EVENTS_LOG)
        log.write(record)
        log.close()

    def compact_logs(self) -> None:
        """Each log's parts so far become one segment (on S3; see orchestrator/storage/jsonl.py):
        called at checkpoints, so readers' requests grow with checkpoints, not with flushes."""
        for name in (METRICS_LOG, EVENTS_LOG):
            if self.fence is None:
                compact(join(self.uri, name), self.s3)
                continue
            with self.fence.writing():  # a compaction rewrites the log: the lease holder's write
                compact(join(self.uri, name), self.s3)

    def events(self) -> list[dict[str, Any]]:
        return read_records(self.uri, EVENTS_LOG, self.s3)

    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl as one history: each step once, the latest branch after a resume."""
        return supersede(read_records(self.uri, METRICS_LOG, self.s3))
