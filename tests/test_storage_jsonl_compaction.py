"""Compaction of run logs on object storage (orchestrator/storage/jsonl.py): a log's parts become
one segment, so reading it costs requests per compaction (checkpoint), not per flush; a kill at
any point of a compaction loses no record and repeats none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from s3_server import MotoS3Process

from orchestrator.storage import JsonlLog, RunDir, read_records
from orchestrator.storage import jsonl as jsonl_mod
from orchestrator.storage.clients import s3_client
from orchestrator.storage.jsonl import PARTS_SUFFIX, SEGMENT_PREFIX, compact
from orchestrator.storage.files import listdir

ROOT = Path(__file__).resolve().parents[1]


class Requests:
    """S3 requests this process's client sends (botocore's before-send event), by operation."""

    def __init__(self, s3cfg):
        self.events = s3_client(s3cfg).meta.events
        self.ops: list[str] = []

    def _count(self, request, **_):
        self.ops.append(request.url.split("?")[1].split("&")[0] if "?" in request.url else request.method)

    def __enter__(self):
        self.events.register("before-send.s3", self._count)
        return self

    def __exit__(self, *exc):
        self.events.unregister("before-send.s3", self._count)


def _write_parts(s3_server, bucket: str, key: str, steps: range) -> None:
    """One part per step, named as JsonlLog names them (``<ns>-<pid>.jsonl``, in write order),
    put straight into the local S3 server's store (20,000 HTTP PUTs would take minutes here)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for step in steps:
        backend.put_object(bucket, f"{key}{PARTS_SUFFIX}/{step:020d}-1.jsonl", _part(step))


def _part(step: int) -> bytes:
    return json.dumps({"step": step, "loss": 1.0 / step}).encode() + b"\n"


def _put_parts(s3_server, bucket: str, key: str, steps: range) -> None:
    """The same through the S3 API, a few requests at a time."""
    c = s3_server.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: c.put_object(Bucket=bucket, Key=f"{key}{PARTS_SUFFIX}/{s:020d}-1.jsonl",
                                             Body=json.dumps({"step": s}).encode() + b"\n"), steps))


def _steps(run: str, cfg) -> list[int]:
    return [r["step"] for r in read_records(run, "metrics.jsonl", cfg)]


@pytest.mark.slow  # compaction GETs the 20,000 parts: about a minute on 2 shared cores
def test_20000_parts_read_back_after_compaction_in_few_requests(s3_server):
    bucket = f"compact-{uuid.uuid4().hex[:8]}"
    parts = ((bucket, f"runs/month/metrics.jsonl{PARTS_SUFFIX}/{step:020d}-1.jsonl", _part(step)) for step in range(1, 20_001))
    with MotoS3Process(parts) as moto:  # the server on the other core: 20,000 GETs
        run, cfg = f"s3://{bucket}/runs/month", s3_server.s3_config(endpoint_url=moto.endpoint_url)
        assert compact(f"{run}/metrics.jsonl", cfg) == 20_000
        with Requests(cfg) as after:
            steps = _steps(run, cfg)
        assert steps == list(range(1, 20_001))
        assert len(after.ops) < 100, after.ops  # a listing page and the segment
        names = listdir(f"{run}/metrics.jsonl{PARTS_SUFFIX}", cfg)
        assert len(names) == 1 and names[0].startswith(SEGMENT_PREFIX)


def test_compactions_at_checkpoints_make_reads_grow_with_checkpoints(s3_server):
    """1,105 parts (past a listing page and a DeleteObjects batch of 1,000) and three
    checkpoints: the reader lists once and reads the three segments and the loose tail."""
    bucket = s3_server.create_bucket(f"compact-{uuid.uuid4().hex[:8]}")
    run, cfg = f"s3://{bucket}/runs/ckpt", s3_server.s3_config()
    key = "runs/ckpt/metrics.jsonl"
    for lo, hi in ((1, 1006), (1006, 1056), (1056, 1076)):
        _write_parts(s3_server, bucket, key, range(lo, hi))
        RunDir(run, cfg).compact_logs()  # what rank 0 does at a checkpoint
    _put_parts(s3_server, bucket, key, range(1076, 1106))  # flushed after the last checkpoint
    with Requests(cfg) as reads:
        assert _steps(run, cfg) == list(range(1, 1106))
    assert sorted(reads.ops).count("GET") == 3 + 30 + 1  # segments, loose parts, the local-file probe
    assert len(reads.ops) == 3 + 30 + 1 + 1  # and one listing
    names = listdir(f"{run}/metrics.jsonl{PARTS_SUFFIX}", cfg)
    assert sum(n.startswith(SEGMENT_PREFIX) for n in names) == 3 and len(names) == 33
    assert compact(f"s3://{bucket}/runs/ckpt/events.jsonl", cfg) == 0  # an empty log: nothing to do


def test_crash_between_segment_and_deletion_loses_and_repeats_nothing(s3_server, monkeypatch):
    bucket = s3_server.create_bucket(f"compact-{uuid.uuid4().hex[:8]}")
    run, cfg = f"s3://{bucket}/runs/crash", s3_server.s3_config()
    _put_parts(s3_server, bucket, "runs/crash/metrics.jsonl", range(1, 41))

    real = jsonl_mod.delete_many

    def dies_after(n):
        def delete_many(uris, s3cfg=None):
            real(uris[:n], s3cfg)  # some parts deleted (or none), then the process is gone
            raise KeyboardInterrupt

        return delete_many

    for deleted in (0, 15):  # crash before deleting anything; crash half-way through
        monkeypatch.setattr(jsonl_mod, "delete_many", dies_after(deleted))
        with pytest.raises(KeyboardInterrupt):
            compact(f"{run}/metrics.jsonl", cfg)
        assert _steps(run, cfg) == list(range(1, 41))
    # Two segments now hold parts 1-40 (the second the 25 left loose); more parts arrive; the next
    # compaction (a restarted run) finishes the job.
    monkeypatch.undo()
    _put_parts(s3_server, bucket, "runs/crash/metrics.jsonl", range(41, 46))
    assert _steps(run, cfg) == list(range(1, 46))
    assert compact(f"{run}/metrics.jsonl", cfg) == 40 - 15 + 5
    assert _steps(run, cfg) == list(range(1, 46))
    assert all(n.startswith(SEGMENT_PREFIX) for n in listdir(f"{run}/metrics.jsonl{PARTS_SUFFIX}", cfg))


def test_segments_merge_so_reads_stay_bounded_on_any_run_length(s3_server, monkeypatch):
    """With MAX_SEGMENTS=3, ten checkpoints leave at most 3 segments; a crash during a merge
    (the merged segment written, nothing deleted) still reads every record once."""
    monkeypatch.setattr(jsonl_mod, "MAX_SEGMENTS", 3)
    bucket = s3_server.create_bucket(f"compact-{uuid.uuid4().hex[:8]}")
    run, cfg = f"s3://{bucket}/runs/merge", s3_server.s3_config()
    seg_counts = []
    for ckpt in range(10):
        _write_parts(s3_server, bucket, "runs/merge/metrics.jsonl", range(10 * ckpt + 1, 10 * ckpt + 11))
        compact(f"{run}/metrics.jsonl", cfg)
        names = listdir(f"{run}/metrics.jsonl{PARTS_SUFFIX}", cfg)
        seg_counts.append(len(names))
        assert all(n.startswith(SEGMENT_PREFIX) for n in names)
    assert max(seg_counts) == 3 and seg_counts[:4] == [1, 2, 3, 1]
    assert _steps(run, cfg) == list(range(1, 101))
    _write_parts(s3_server, bucket, "runs/merge/metrics.jsonl", range(101, 104))
    real_delete = jsonl_mod.delete_many
    monkeypatch.setattr(jsonl_mod, "delete_many", lambda uris, s3cfg=None: None)  # killed before deleting
    segments = lambda: [n for n in listdir(f"{run}/metrics.jsonl{PARTS_SUFFIX}", cfg)  # noqa: E731
                        if n.startswith(SEGMENT_PREFIX)]
    while len(segments()) <= 3:  # compactions, then a merge (of 3 segments into a 4th), none deleting
        compact(f"{run}/metrics.jsonl", cfg)
    assert _steps(run, cfg) == list(range(1, 104))
    monkeypatch.setattr(jsonl_mod, "delete_many", real_delete)
    compact(f"{run}/metrics.jsonl", cfg)  # the next checkpoint: merges everything
    assert _steps(run, cfg) == list(range(1, 104))
    assert len(listdir(f"{run}/metrics.jsonl{PARTS_SUFFIX}", cfg)) == 1


KILLED = textwrap.dedent("""
    import os, signal, sys
    from orchestrator.config import S3Config
    from orchestrator.storage import jsonl
    real = jsonl.delete_many
    def delete_many(uris, s3cfg=None):
        real(uris[: len(uris) // 2], s3cfg)
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies mid-deletion
    jsonl.delete_many = delete_many
    jsonl.compact(sys.argv[1], S3Config(endpoint_url=sys.argv[2], region="us-east-1"))
""")


def test_process_killed_during_compaction_loses_nothing(s3_server):
    bucket = s3_server.create_bucket(f"compact-{uuid.uuid4().hex[:8]}")
    run, cfg = f"s3://{bucket}/runs/killed", s3_server.s3_config()
    _put_parts(s3_server, bucket, "runs/killed/metrics.jsonl", range(1, 31))
    proc = subprocess.run([sys.executable, "-c", KILLED, f"{run}/metrics.jsonl", s3_server.endpoint_url],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    names = listdir(f"{run}/metrics.jsonl{PARTS_SUFFIX}", cfg)
    assert sum(n.startswith(SEGMENT_PREFIX) for n in names) == 1 and len(names) == 1 + 15
    assert _steps(run, cfg) == list(range(1, 31))


def test_writer_compacts_every_n_parts_and_keeps_one_history(s3_server, monkeypatch):
    """Without checkpoints a writer compacts its log every COMPACT_EVERY_PARTS flushes; a resumed
    run's redone steps still supersede the old branch."""
    monkeypatch.setattr(jsonl_mod, "COMPACT_EVERY_PARTS", 4)
    bucket = s3_server.create_bucket(f"compact-{uuid.uuid4().hex[:8]}")
    run, cfg = f"s3://{bucket}/runs/w", s3_server.s3_config()
    log = JsonlLog(run, "metrics.jsonl", cfg, flush_every_s=1e9)
    for step in range(1, 11):
        log.write({"step": step})
        log.flush()
    log = JsonlLog(run, "metrics.jsonl", cfg, flush_every_s=1e9)  # resumed from step 6
    for step in range(7, 10):
        log.write({"step": step, "resumed": True})
        log.flush()
    names = listdir(f"{run}/metrics.jsonl{PARTS_SUFFIX}", cfg)
    assert [n.startswith(SEGMENT_PREFIX) for n in names].count(True) == 2 and len(names) == 2 + 2 + 3
    hist = RunDir(run, cfg).metrics()
    assert [r["step"] for r in hist] == list(range(1, 10))
    assert [bool(r.get("resumed")) for r in hist] == [False] * 6 + [True] * 3


def test_local_logs_are_not_compacted(tmp_path):
    log = JsonlLog(str(tmp_path / "run"), "metrics.jsonl")
    log.write({"step": 1})
    assert compact(str(tmp_path / "run" / "metrics.jsonl")) == 0
    RunDir(str(tmp_path / "run")).compact_logs()
    assert RunDir(str(tmp_path / "run")).metrics() == [{"step": 1}]
