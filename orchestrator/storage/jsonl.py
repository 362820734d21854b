"""Append-only JSON-lines logs (metrics.jsonl, events.jsonl) that scale to long runs on S3.

Object stores have no append, and rewriting the whole object per line is quadratic in the run
length (an 800k-step job would rewrite gigabytes). So on S3 records are buffered and each flush
writes one new object ``<name>.parts/<time_ns>.jsonl``; the names sort in write order. A flush
happens every ``flush_every_s`` seconds, at every checkpoint and on close, so a run killed between
flushes loses at most the records since the last one. On local disk every record is appended
to ``<name>`` at once (the whole history stays ``tail -f``-able).

``read_records`` joins the local file and the parts in write order; ``supersede`` turns
step-keyed records (metrics) into one history: a later record at a step at or below an earlier one starts a new branch
(a resumed run redoing steps after its checkpoint) and supersedes the old records from that step
on, so the history never holds a step twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.storage.files import listdir, read_bytes, write_bytes
from orchestrator.storage.uri import join, parse_uri

if TYPE_CHECKING:
    from orchestrator.config import S3Config
    from orchestrator.storage.fence import Fence

PARTS_SUFFIX = ".parts"


class JsonlLog:
    """One writer's handle on ``{run_uri}/{name}``; call ``flush()`` at checkpoints, ``close()`` at the end."""

    def __init__(self, run_uri: str, name: str, s3cfg: "S3Config | None" = None, *, flush_every_s: float = 30.0,
                 fence: "Fence | None" = None):
        self.uri = join(run_uri, name)
        self.fence = fence  # the lease holder's (fence.py): no record reaches storage after a takeover
        self.s3cfg = s3cfg
        self.flush_every_s = flush_every_s
        self.is_s3 = parse_uri(self.uri).is_s3
        self._buffer: list[str] = []
        self._last_flush = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if not self.is_s3:
            path = Path(parse_uri(self.uri).key)
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._writing(), open(path, "a", encoding="utf-8") as f:
                f.write(line)
            return
        self._buffer.append(line)
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        # Nanosecond wall-clock names sort in write order across writers that follow each other
        # (a run and its resume); the pid separates two objects written in the same nanosecond.
        part = join(f"{self.uri}{PARTS_SUFFIX}", f"{time.time_ns():020d}-{os.getpid()}.jsonl")
        with self._writing():
            write_bytes(part, "".join(self._buffer).encode(), self.s3cfg)
        self._buffer.clear()

    def _writing(self):
        return self.fence.writing() if self.fence is not None else contextlib.nullcontext()

    def close(self) -> None:
        self.flush()

    def rewind(self, step: int) -> None:
        """A resumed run continues from ``step``: drop the records after it, so the log never
        holds a step twice. Local files are rewritten once (atomically); object-store parts are
        immutable and ``supersede`` drops the old branch when they are read."""
        self._buffer = [line for line in self._buffer if _step_of(line) <= step]
        if self.is_s3:
            return
        path = Path(parse_uri(self.uri).key)
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) <= step]
        if len(kept) != len(lines):
            with self._writing():
                write_bytes(self.uri, "".join(kept).encode(), self.s3cfg)


def _step_of(line: str) -> float:
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return float("inf")  # torn or foreign lines go with the superseded tail
    return step if isinstance(step, int) else float("-inf")


def _parse_lines(data: bytes) -> list[dict[str, Any]]:
    out = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write: the rest of the history is intact
    return out


def read_records(run_uri: str, name: str, s3cfg: "S3Config | None" = None) -> list[dict[str, Any]]:
    """Every record of the log in write order (local file first, then the parts)."""
    uri = join(run_uri, name)
    records: list[dict[str, Any]] = []
    try:
        records += _parse_lines(read_bytes(uri, s3cfg))
    except FileNotFoundError:
        pass
    parts_uri = f"{uri}{PARTS_SUFFIX}"
    for part in listdir(parts_uri, s3cfg):
        records += _parse_lines(read_bytes(join(parts_uri, part), s3cfg))
    return records


def supersede(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop records that a later branch redid: keeps the steps strictly increasing."""
    out: list[dict[str, Any]] = []
    for r in records:
        step = r.get("step")
        if isinstance(step, int):
            while out and isinstance(out[-1].get("step"), int) and out[-1]["step"] >= step:
                out.pop()
        out.append(r)
    return out
