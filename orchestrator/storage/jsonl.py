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

**Compaction** keeps reading cheap on long runs (a 30-day run flushing every 30 s writes ~86,000
parts per log): at every checkpoint (``RunDir.compact_logs``) and after every
``COMPACT_EVERY_PARTS`` parts of one writer, the parts present become one segment object,
``<name>.parts/segment-<last part>-<time>-<pid>.jsonl``, whose first line names the parts it holds
and their line counts; then the parts are deleted. A compaction that finds ``MAX_SEGMENTS``
segments merges them into its own as well. Readers take each part's lines once, from the first
segment (in name order) or part that holds it, and order everything by part name (write order), so a run killed between the segment's write and the parts' deletion (or while deleting,
or two compactions of the same parts) loses nothing and repeats nothing. A reader's requests then
stay bounded (a listing, at most ``MAX_SEGMENTS`` segments, the parts since the last checkpoint)
instead of growing with the flushes.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.storage.files import delete_many, listdir, read_bytes, read_many, write_bytes
from orchestrator.storage.uri import StorageError, join, parse_uri

if TYPE_CHECKING:
    from orchestrator.config import S3Config
    from orchestrator.storage.fence import Fence

PARTS_SUFFIX = ".parts"
SEGMENT_PREFIX = "segment-"
SEGMENT_KEY = "_segment"  # the first line of a segment: {"_segment": [[part name, lines], ...]}
COMPACT_EVERY_PARTS = 256  # parts one writer flushes between compactions (without checkpoints)
# Segments a compaction finds before it merges them all into its own: a reader's requests stay
# under ~MAX_SEGMENTS + the parts since the last compaction; merging rewrites the log once per
# MAX_SEGMENTS checkpoints (a month of metrics is megabytes: cheap).
MAX_SEGMENTS = 32


def part_name(time_ns: int, pid: int) -> str:
    """A part's name: sorts in write order (fixed-width nanoseconds), unique per writer (pid)."""
    return f"{time_ns:020d}-{pid}.jsonl"


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
        self._parts = 0  # parts written since this writer's last compaction

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
        part = join(f"{self.uri}{PARTS_SUFFIX}", part_name(time.time_ns(), os.getpid()))
        with self._writing():
            write_bytes(part, "".join(self._buffer).encode(), self.s3cfg)
        self._buffer.clear()
        self._parts += 1
        if self._parts >= COMPACT_EVERY_PARTS:
            self._parts = 0
            with self._writing():  # a compaction rewrites the log: the lease holder's write
                compact(self.uri, self.s3cfg)

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


def _lines(data: bytes) -> list[str]:
    return [line for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]


def _segment_parts(lines: list[str]) -> dict[str, list[str]] | None:
    """A segment's lines per part it holds; None when its header is unreadable."""
    try:
        held = json.loads(lines[0])[SEGMENT_KEY] if lines else None
    except (json.JSONDecodeError, KeyError, TypeError):
        held = None
    if not isinstance(held, list):
        return None
    out, i = {}, 1
    for name, count in held:
        out[name] = lines[i : i + count]
        i += count
    return out


def _parts_lines(parts_uri: str, s3cfg: "S3Config | None", tries: int = 3) -> dict[str, list[str]]:
    """{part name: its lines}, each part once (from the first segment holding it, else itself).
    A part or segment gone between the listing and its read was compacted meanwhile: list again."""
    names = listdir(parts_uri, s3cfg)
    segments = [n for n in names if n.startswith(SEGMENT_PREFIX)]
    held: dict[str, list[str]] = {}
    for seg, data in zip(segments, read_many([join(parts_uri, n) for n in segments], s3cfg)):
        if data is None:
            return _parts_lines(parts_uri, s3cfg, tries - 1) if tries > 1 else _gone(parts_uri, seg)
        per_part = _segment_parts(_lines(data))
        if per_part is None:  # not a segment this code wrote: its lines as one part
            per_part = {seg: _lines(data)}
        for part, lines in per_part.items():
            held.setdefault(part, lines)
    loose = [n for n in names if not n.startswith(SEGMENT_PREFIX) and n not in held]
    for part, data in zip(loose, read_many([join(parts_uri, n) for n in loose], s3cfg)):
        if data is None:
            return _parts_lines(parts_uri, s3cfg, tries - 1) if tries > 1 else _gone(parts_uri, part)
        held[part] = _lines(data)
    return held


def _gone(parts_uri: str, name: str) -> dict[str, list[str]]:
    raise StorageError(f"{join(parts_uri, name)} disappeared while the log was read, three times (compactions "
                       "racing the read). Fix: read it again")


def read_records(run_uri: str, name: str, s3cfg: "S3Config | None" = None) -> list[dict[str, Any]]:
    """Every record of the log in write order (local file first, then the parts, compacted or not)."""
    uri = join(run_uri, name)
    records: list[dict[str, Any]] = []
    try:
        records += _parse_lines(read_bytes(uri, s3cfg))
    except FileNotFoundError:
        pass
    held = _parts_lines(f"{uri}{PARTS_SUFFIX}", s3cfg)
    for part in sorted(held):  # part names sort in write order
        records += _parse_lines("\n".join(held[part]).encode())
    return records


def compact(uri: str, s3cfg: "S3Config | None" = None) -> int:
    """Make the loose parts of the log at ``uri`` one segment (see the module's docstring); the
    number of loose parts compacted. When ``MAX_SEGMENTS`` segments exist they are merged into
    the new one too, so a reader never reads more than that many, however long the run. The new
    segment is written before anything is deleted, so a kill at any point loses nothing, and
    readers take a part held twice once."""
    if not parse_uri(uri).is_s3:
        return 0  # local logs are one appended file
    parts_uri = f"{uri}{PARTS_SUFFIX}"
    names = listdir(parts_uri, s3cfg)
    segments = [n for n in names if n.startswith(SEGMENT_PREFIX)]
    loose = [n for n in names if not n.startswith(SEGMENT_PREFIX)]
    merge = len(segments) >= MAX_SEGMENTS
    if len(loose) < 2 and not merge:
        return 0
    # Otherwise only the loose parts are read (compaction costs what was flushed since the last
    # one). A part that an interrupted compaction already put in a segment goes into this one
    # again; readers take it once.
    held: dict[str, list[str]] = {}
    sources = (segments if merge else []) + loose
    for name, data in zip(sources, read_many([join(parts_uri, n) for n in sources], s3cfg)):
        if data is None:
            continue  # gone: another compaction took it
        per_part = _segment_parts(_lines(data)) if name.startswith(SEGMENT_PREFIX) else None
        for part, lines in (per_part if per_part is not None else {name: _lines(data)}).items():
            held.setdefault(part, lines)
    if not held:
        return 0
    order = sorted(held)
    header = {SEGMENT_KEY: [[n, len(held[n])] for n in order]}
    body = "".join(line + "\n" for line in [json.dumps(header), *(x for n in order for x in held[n])])
    # Unique (time and pid): never the name of a segment about to be deleted.
    seg = f"{SEGMENT_PREFIX}{order[-1].removesuffix('.jsonl')}-{time.time_ns()}-{os.getpid()}.jsonl"
    write_bytes(join(parts_uri, seg), body.encode(), s3cfg)
    delete_many([join(parts_uri, n) for n in sources if n != seg], s3cfg)
    return len(loose)


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
