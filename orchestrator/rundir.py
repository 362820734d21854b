"""The run directory ``{run.storage}/{run.name}`` on local disk or object storage.

Ray Train writes checkpoints there itself; raydiff adds ``config.yaml``, ``plan.json``,
``metrics.jsonl``, ``events.jsonl``, ``samples/*.png`` and ``eval.json``. A thin view over
orchestrator.storage, so a laptop directory and an ``s3://`` prefix get the same atomic local
writes, S3 retries and credential-free error messages.
"""

from __future__ import annotations

from orchestrator import storage
from orchestrator.config import S3Config, TrainConfig


class RunDir:
    def __init__(self, uri: str, s3: S3Config | None = None):
        self.uri = uri.rstrip("/")
        self.s3 = s3

    @classmethod
    def for_config(cls, cfg: TrainConfig) -> "RunDir":
        return cls(storage.join(cfg.run.storage, cfg.run.name), cfg.data.s3)

    def _u(self, rel: str) -> str:
        return storage.join(self.uri, rel) if rel else self.uri

    def write_bytes(self, rel: str, data: bytes) -> str:
        storage.write_bytes(self._u(rel), data, self.s3)
        return self._u(rel)

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        return storage.read_bytes(self._u(rel), self.s3)

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def exists(self, rel: str) -> bool:
        return storage.exists(self._u(rel), self.s3)

    def append_text(self, rel: str, text: str) -> None:
        """Append to a small text file (object stores: read, extend, rewrite)."""
        storage.append_text(self._u(rel), text, self.s3)

    def listdir(self, rel: str = "") -> list[str]:
        return storage.listdir(self._u(rel), self.s3)
