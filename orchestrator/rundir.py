"""The run directory ``{run.storage}/{run.name}`` on local disk or object storage.

Ray Train writes checkpoints there itself; raydiff adds ``config.yaml``, ``plan.json``,
``metrics.jsonl``, ``samples/*.png`` and ``eval.json``. Everything goes through a pyarrow
filesystem so the same code serves a laptop directory and an ``s3://`` prefix.
"""

from __future__ import annotations

import posixpath

import pyarrow.fs as pafs

from orchestrator.config import TrainConfig


class RunDir:
    def __init__(self, fs: pafs.FileSystem, path: str, uri: str):
        self.fs = fs
        self.path = path.rstrip("/")
        self.uri = uri.rstrip("/")

    @classmethod
    def for_config(cls, cfg: TrainConfig) -> "RunDir":
        from orchestrator.storage import filesystem_for

        fs, base = filesystem_for(cfg.run.storage, cfg.data.s3)
        uri = cfg.run.storage.rstrip("/") + "/" + cfg.run.name
        return cls(fs, posixpath.join(base, cfg.run.name), uri)

    def _p(self, rel: str) -> str:
        return posixpath.join(self.path, rel)

    def write_bytes(self, rel: str, data: bytes) -> str:
        parent = posixpath.dirname(self._p(rel))
        if parent:
            self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(self._p(rel)) as f:
            f.write(data)
        return f"{self.uri}/{rel}"

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._p(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self._p(rel)).type != pafs.FileType.NotFound

    def append_text(self, rel: str, text: str) -> None:
        """Append to a small text file. Object stores have no append: read, extend, rewrite."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(posixpath.dirname(self._p(rel)), recursive=True)
            with self.fs.open_append_stream(self._p(rel)) as f:
                f.write(text.encode())
            return
        old = self.read_bytes(rel) if self.exists(rel) else b""
        self.write_bytes(rel, old + text.encode())

    def listdir(self, rel: str = "") -> list[str]:
        sel = pafs.FileSelector(self._p(rel), allow_not_found=True)
        return sorted(posixpath.basename(i.path) for i in self.fs.get_file_info(sel))
